"""The paper's CLIP metrics (text alignment, domain similarity, motion smoothness, frame consistency)
and the SD safety checker over videos: `metrics` (pure functions over normalised embeddings),
`clip_eval` (videos and prompts -> embeddings -> a JSON-able result), `inputs` (what the `evaluate`
command reads), `sample_checks` (what `sample` runs after decoding)."""

from animatediff_jax.evaluation.clip_eval import check_videos, evaluate_videos, format_table, write_json
from animatediff_jax.evaluation.metrics import aggregate, per_video, video_metrics

__all__ = ["aggregate", "check_videos", "evaluate_videos", "format_table", "per_video", "video_metrics", "write_json"]
