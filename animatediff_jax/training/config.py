"""Training configuration: every field with its default, shared by all stage configs.

Stage files (`configs/train/*.py`) start from `base_config()` and change what differs; any
field can be overridden on the command line (`--config.train.batch_size=8`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from animatediff_jax import dtypes
from animatediff_jax.errors import ConfigError

if TYPE_CHECKING:  # stages imports jax: config files load this module without it
    from animatediff_jax.training.stages import Stage


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.stage = "motion_module"  # domain_adapter | motion_module | motion_lora (or 1 / 2 / 3)
    c.workdir = "runs/train"  # checkpoints/, metrics.jsonl, TensorBoard events, exported params
    c.seed = 0  # training randomness (noise, timesteps, LoRA init); data order uses data.seed
    # JAX's persistent compilation cache: "auto" = <workdir>/jax_cache (a resumed run skips compiling), a
    # folder (local or gs://, shared by every host), or "" (off).
    c.compilation_cache = "auto"
    # A folder written by `animatediff-jax compile train ... --save DIR`: its step is loaded instead of
    # compiled when it was built for these devices, this config's program and these jax/libtpu versions.
    c.executables = ""

    for group in (_model, _train, _parallel, _data, _outputs):
        group(c)
    return c


def _model(c: ConfigDict) -> None:
    """The model files: base, motion module, adapters, LoRA."""
    c.model = m = ConfigDict()
    # The base: a converted SD1.5 folder (`animatediff-jax convert sd15 ... --out DIR`), or an SDXL one (converted
    # by `convert sdxl`, or a diffusers SDXL folder), told apart by its files; "" = random weights of `size`.
    m.pretrained = ""
    # Random-init size when pretrained == "": "sd15" | "sdxl" | "tiny" | "tiny_sdxl"; also the base a pretrained
    # folder that is not on this host is taken to be (`compile`: "sd15" or "sdxl").
    m.size = "sd15"
    m.random_init = "flax"  # "flax" (the modules' initialisers) | "fast" (host numpy; smoke runs)
    m.init_seed = 0  # seed of random init (same for every stage, so tiny stages chain)
    # Motion-module layout of stages 2 and 3: v1 | v2 | v3 (SD1.5), sdxl_beta | hotshot_xl (SDXL).
    m.motion_version = "v2"
    # Motion-module GroupNorm: True per frame (the original's, what its checkpoints were trained with), False
    # across all frames (diffusers'); unset: the release's own (v1-v3, hotshot_xl per frame; sdxl_beta across).
    # A motion_module file that records it (our params files) keeps its own.
    m.motion_norm_per_frame = placeholder(bool)
    m.motion_module = ""  # params file of motion modules (stage 2: start from; stage 3: the frozen modules)
    m.domain_adapter = ""  # params file of a domain adapter, attached in stages 2 and 3
    m.domain_adapter_scale = 1.0
    m.init_lora = ""  # params file of a LoRA to continue training (stages 1 and 3)
    m.lora_rank = 64
    m.lora_scale = 1.0  # scale of the trained LoRA in the forward pass (and stored in its export)
    m.vae = True  # load the VAE (needed when batches hold pixels, not cached latents)
    m.text_encoder = True  # load the text encoder (needed when batches hold token ids, not contexts)



def _train(c: ConfigDict) -> None:
    """The run: steps, clips, optimizer, loss."""
    c.train = t = ConfigDict()
    t.steps = 100_000
    t.batch_size = 4  # global (all processes); must divide by the mesh's data x fsdp size
    t.num_frames = 16
    t.resolution = 256
    t.grad_accum_steps = 1  # the global batch is cut into this many micro-batches (lax.scan)
    # A step whose loss or gradients are NaN/inf is skipped (params and optimizer state unchanged);
    # this many in a row stop the run (exit code 3). 0: never stop.
    t.max_nonfinite_steps = 10

    c.optim = o = ConfigDict()
    o.learning_rate = 1e-4
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 1e-2
    o.grad_clip = 1.0
    o.warmup_steps = 0

    c.loss = ls = ConfigDict()
    ls.prediction_type = "epsilon"  # or "v_prediction"
    ls.min_snr_gamma = 0.0  # > 0: min-SNR-gamma weighting (5.0 is the paper's choice)
    ls.num_train_timesteps = 1000
    ls.beta_start = 0.00085
    ls.beta_end = 0.012
    ls.beta_schedule = "linear"



def _parallel(c: ConfigDict) -> None:
    """The mesh, sharding, dtypes, remat, attention."""
    c.parallel = p = ConfigDict()
    # Axis order = mesh order; one axis may be -1. FSDP over every chip by default: per-chip params and AdamW
    # moments shrink as chips are added (stage 2, 16x256², v5e, `animatediff-jax compile`: 6.98 GiB of
    # arguments per chip replicated, 0.89 GiB at fsdp=8). Several slices: data = the number of slices.
    p.mesh_shape = ConfigDict({"data": 1, "fsdp": -1})
    p.batch_axes = ("data", "fsdp")
    p.fsdp_axis = "fsdp"
    p.min_fsdp_size = 4096  # arrays with fewer elements are replicated
    p.compute_dtype = "bfloat16"  # activations / matmuls; trainable params and optimizer stay float32
    # Storage of the frozen weights (UNet base, VAE, text encoder; never the trainable params or the
    # optimizer state, which stay float32): "bfloat16" halves their memory. LoRA stages add their
    # factors unmerged at run time, so a bf16 base does not round the trained delta away.
    p.frozen_dtype = "float32"
    p.remat = "none"  # per-block jax.checkpoint policy: none | full | dots_saveable | ... (models.unet.REMAT_POLICIES)
    # The UNet's attention kernel (models.attention.IMPLEMENTATIONS): auto | xla | chunked | cudnn | splash.
    # "auto": cuDNN flash (GPU) / splash (TPU) / blockwise (CPU) for long sequences, XLA for short ones.
    # The VAE encoder and text encoder of the step always use "auto".
    p.attention = "auto"
    p.distributed = "auto"  # jax.distributed.initialize(): auto (pods / env vars) | true | false
    p.coordinator = ""  # host:port, off-TPU multi-host only
    p.num_processes = 0
    p.process_id = -1



def _data(c: ConfigDict) -> None:
    """Where clips come from and how they are read."""
    c.data = d = ConfigDict()
    d.source = "webvid"  # webvid | tfds | cache | synthetic
    d.csv = ""  # webvid: the CSV (videoid, name, page_dir)
    d.video_folder = ""  # webvid: folder of {videoid}.mp4
    d.tfds_name = ""  # tfds: dataset name or prepared builder dir
    d.tfds_split = "train"
    d.tfds_data_dir = ""
    d.cache_dir = ""  # cache: output of `prepare` (VAE latents + text contexts)
    d.synthetic_clips = 64  # synthetic: number of moving-square clips
    d.stride = 4
    d.flip = True
    d.caption_dropout = 0.1  # captions replaced by "" for classifier-free guidance
    d.tokenizer = ""  # CLIP tokenizer folder ("" = <pretrained>/tokenizer); "hash" = toy word hashing
    d.tokenizer_2 = ""  # SDXL's second tokenizer folder ("" = <pretrained>/tokenizer_2)
    d.seed = 0
    d.shuffle = True
    # Decoding: worker_count processes (grain mp_prefetch) of read_threads threads each, or 0: threads
    # of the training process. The batches, and the data state a checkpoint keeps, are the same either
    # way, so a run may resume with another worker_count.
    d.worker_count = 0
    d.worker_buffer_size = 2  # decoded clips queued per worker process
    d.read_threads = 8
    d.prefetch = 64  # read-ahead in clips of each reader (the training process, or each worker)
    # Unreadable records (missing / broken videos) are skipped and counted; this many in a row
    # (or two passes over the data with nothing readable) stop the run. 0: never.
    d.max_skips_in_a_row = 1000



def _outputs(c: ConfigDict) -> None:
    """Checkpoints, logs, validation samples, CLIP metrics."""
    c.checkpoint = k = ConfigDict()
    k.every = 1000  # save the train state every N steps (and at the end)
    k.keep = 3  # keep the last K checkpoints
    k.async_save = True
    k.export_every = 0  # also export the trainable params every N steps (0: at the end only)

    c.log = lg = ConfigDict()
    lg.every = 50  # console + metric files every N steps
    lg.tensorboard = True  # TensorBoard event files (tensorboardX) besides metrics.jsonl
    lg.validate_every = 0  # validation samples (GIFs in workdir/samples) every N steps; 0 = never
    lg.sample_prompts = ()  # prompts of the validation samples (one GIF each); empty = no samples
    lg.sample_steps = 25
    lg.sample_guidance = 7.5
    lg.sample_scheduler = "ddim"
    lg.sample_frames = 0  # 0: train.num_frames
    lg.sample_size = 0  # 0: train.resolution
    lg.sample_seed = 42  # prompt i uses seed sample_seed + i
    # CLIP metrics (animatediff_jax.evaluation: text alignment, smoothness, consistency) of videos sampled with
    # the current params every N steps, as the validation samples are made, logged as eval/* (metrics.jsonl,
    # TensorBoard); 0 = never. eval_clip: a transformers CLIP folder (CLIPModel with its tokenizer).
    lg.eval_every = 0
    lg.eval_clip = ""
    lg.eval_prompts = ()  # the fixed prompt set; () = log.sample_prompts
    lg.eval_seeds = ()  # one per prompt (or one for all); () = sample_seed + i


@dataclasses.dataclass(frozen=True)
class Validated:
    """A config that passed `validate_config`, with the stage it names: what `train` hands on, so
    nothing after the entry checks the config or resolves its stage again."""

    config: ConfigDict
    stage: Stage


def check_config(c: ConfigDict) -> ConfigDict:
    """Rejects bad choice fields before anything loads or compiles: one line naming the field and
    the valid values (dtypes: any name of `animatediff_jax.dtypes`)."""
    from animatediff_jax.models.attention import IMPLEMENTATIONS
    from animatediff_jax.models.unet import REMAT_POLICIES

    p = c.parallel
    for field, value, valid in (("parallel.attention", p.get("attention", "auto"), IMPLEMENTATIONS),
                                ("parallel.remat", p.remat, REMAT_POLICIES)):
        if value not in valid:
            raise ConfigError(f"{field}={value!r} is not one of: {', '.join(valid)}")
    for field in ("compute_dtype", "frozen_dtype"):
        dtypes.canonical(p[field], f"parallel.{field}")
    return c


def check_stage(c: ConfigDict) -> Stage:
    """The stage `c.stage` names (a name or 1 / 2 / 3), or a one-line `ConfigError`."""
    from animatediff_jax.training.stages import get_stage

    try:
        return get_stage(c.stage)
    except ValueError as e:
        raise ConfigError(f"stage: {e}") from None


_SOURCES = ("webvid", "tfds", "cache", "synthetic")


def _number(c: ConfigDict, name: str, lo: float, *, integer: bool = True, strict: bool = False) -> None:
    node = c
    for part in name.split("."):
        node = node[part]
    ok = isinstance(node, (int, float)) and not isinstance(node, bool) and node == node and abs(node) != float("inf")
    ok = ok and (not integer or float(node).is_integer()) and (node > lo if strict else node >= lo)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"{name}={node!r}: expected {what} {'>' if strict else '>='} {lo:g}")


SIZES = ("sd15", "sdxl", "tiny", "tiny_sdxl")  # `model.size`: the bases a program is built for without files


def _sdxl_folder(c: ConfigDict) -> tuple | None:
    """The configs of the SDXL base `model.pretrained` names when it is one here (headers only), else None."""
    from animatediff_jax.checkpoints.sdxl import sdxl_folder_configs
    from animatediff_jax.checkpoints.torch_io import CheckpointError

    try:
        return sdxl_folder_configs(c.model.pretrained)
    except (CheckpointError, ValueError) as e:
        raise ConfigError(f"model.pretrained: {e}") from None


def base_family(c: ConfigDict) -> str:
    """"sdxl" or "sd15": the base's, from its files when they are here (`checkpoints.family`), else from
    `model.size`."""
    if c.model.pretrained and fs_isdir(c.model.pretrained):
        from animatediff_jax.checkpoints.family import base_family as files_family

        return files_family(c.model.pretrained)
    return "sdxl" if c.model.size in ("sdxl", "tiny_sdxl") else "sd15"


def size_multiple(c: ConfigDict, files: bool = True) -> int:
    """What `train.resolution` must divide by (VAE factor x UNet downsampling), from the model's
    configs without loading weights (`files=False`: a `model.pretrained` that is not here is
    `model.size`'s base, SD1.5 unless it says sdxl)."""
    from animatediff_jax.models.config import sd15_unet, sdxl_unet, size_multiple, tiny_sdxl_unet, tiny_unet
    from animatediff_jax.models.vae import VAEConfig

    if c.model.pretrained and (files or fs_isdir(c.model.pretrained)):
        import os

        from animatediff_jax.checkpoints.params_io import PARAMS_FILE
        from animatediff_jax.checkpoints.sd15 import sd15_size_multiple
        from animatediff_jax.io import fs

        xl = _sdxl_folder(c)
        if xl is not None:
            return size_multiple(len(xl[0].block_out_channels), len(xl[1].block_out_channels))
        if not fs.isfile(os.path.join(c.model.pretrained, PARAMS_FILE)):
            raise ConfigError(f"model.pretrained={c.model.pretrained!r}: no {PARAMS_FILE} there: not a converted "
                              "SD1.5 folder (`animatediff-jax convert sd15 ... --out DIR`) nor an SDXL one "
                              "(converted, or a diffusers SDXL folder)")
        try:
            return sd15_size_multiple(c.model.pretrained)
        except ValueError as e:
            raise ConfigError(f"model.pretrained: {e}") from None

    if c.model.size == "tiny" and not c.model.pretrained:
        unet, vae = tiny_unet(None), VAEConfig.tiny()
    elif c.model.size == "tiny_sdxl" and not c.model.pretrained:
        unet, vae = tiny_sdxl_unet(None), VAEConfig.tiny()
    elif c.model.size == "sd15":
        unet, vae = sd15_unet(), VAEConfig.sd15()
    elif c.model.size == "sdxl":
        unet, vae = sdxl_unet(), VAEConfig.sdxl()
    else:
        raise ConfigError(f"model.size={c.model.size!r} is not one of: {', '.join(SIZES)}")
    return size_multiple(len(unet.block_out_channels), len(vae.block_out_channels))


_MOTION_VERSIONS = ("v1", "v2", "v3", "sdxl_beta", "hotshot_xl")


def _check_sdxl(c: ConfigDict, stage: "Stage") -> None:
    """The motion layout against the base's family, and what an SDXL run does not have yet."""
    from animatediff_jax.models.config import MotionConfig

    family = base_family(c)
    want = MotionConfig.for_version(c.model.motion_version).family
    if stage.motion_modules and want != family:
        names = {"sd15": "SD1.5 (v1, v2, v3)", "sdxl": "SDXL (sdxl_beta, hotshot_xl)"}
        raise ConfigError(f"model.motion_version={c.model.motion_version!r} is a layout for {names[want]}, but the "
                          f"base (model.pretrained / model.size) is {names[family].split(' ')[0]}: use one of "
                          f"{names[family].split(' ', 1)[1]}")
    if family != "sdxl":
        return
    if c.data.source == "cache":
        raise ConfigError("data.source='cache' is for SD1.5 bases (`prepare` caches no pooled SDXL text): "
                          "an SDXL run reads pixels and token ids (webvid | tfds | synthetic)")
    if c.log.validate_every or c.log.get("eval_every"):
        raise ConfigError("log.validate_every / log.eval_every: validation samples are not wired for SDXL bases yet "
                          "(set them to 0)")


def fs_isdir(folder: str) -> bool:
    from animatediff_jax.io import fs

    return fs.isdir(folder)


def validate_config(c: ConfigDict, files: bool = True) -> Validated:
    """Every check that needs no devices and no weights, before the workdir is made or anything
    compiles: one `ConfigError` line naming the field. (The batch size against the mesh is
    checked by `check_batch` once the devices are known.) `files=False` leaves out the data and
    model files (`compile` builds the program from the config on a host that may have neither).
    Returns the config with its stage (`Validated`), for `train` to pass on."""
    check_config(c)
    stage = check_stage(c)
    for name in ("train.steps", "train.batch_size", "train.num_frames", "train.resolution",
                 "train.grad_accum_steps", "checkpoint.every", "log.every"):
        _number(c, name, 1)
    for name in ("train.max_nonfinite_steps", "optim.warmup_steps", "checkpoint.keep", "checkpoint.export_every",
                 "data.max_skips_in_a_row", "log.validate_every", "data.worker_count", "data.read_threads",
                 "data.prefetch"):
        _number(c, name, 0)
    _number(c, "data.worker_buffer_size", 1)
    _check_eval(c)
    for name in ("optim.learning_rate", "optim.weight_decay", "optim.grad_clip", "optim.eps"):
        _number(c, name, 0, integer=False)
    for name in ("optim.b1", "optim.b2"):
        _number(c, name, 0, integer=False)
        if not c.optim[name.split(".")[1]] < 1:
            raise ConfigError(f"{name}={c.optim[name.split('.')[1]]!r}: expected a number in [0, 1)")
    if not isinstance(c.get("compilation_cache", ""), str):
        raise ConfigError(f"compilation_cache={c.compilation_cache!r}: expected a folder, 'auto' or '' (off)")
    if c.get("executables") and files and not fs_isdir(c.executables):
        raise ConfigError(f"executables={c.executables!r}: no such folder (written by `animatediff-jax compile train "
                          "--save DIR`)")
    if c.model.motion_version not in _MOTION_VERSIONS:
        raise ConfigError(f"model.motion_version={c.model.motion_version!r} is not one of: {', '.join(_MOTION_VERSIONS)}")
    if c.model.size not in SIZES:
        raise ConfigError(f"model.size={c.model.size!r} is not one of: {', '.join(SIZES)}")
    _check_sdxl(c, stage)
    t, d = c.train, c.data
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum_steps="
                          f"{t.grad_accum_steps}")
    if d.source not in _SOURCES:
        raise ConfigError(f"data.source={d.source!r} is not one of: {', '.join(_SOURCES)}")
    if d.source == "webvid" and files:
        from animatediff_jax.io import fs

        if not d.csv or not fs.isfile(d.csv):
            raise ConfigError(f"data.csv={d.csv!r}: no such file (the WebVid CSV: videoid, name, page_dir)")
        if not d.video_folder or not fs.isdir(d.video_folder):
            raise ConfigError(f"data.video_folder={d.video_folder!r}: no such folder")
    if d.source != "cache":
        m = size_multiple(c, files)
        if t.resolution % m:
            raise ConfigError(f"train.resolution={t.resolution} must be a multiple of {m} for this model "
                              "(VAE factor x UNet downsampling)")
    return Validated(c, stage)


def _check_eval(c: ConfigDict) -> None:
    """`log.eval_*`: a CLIP folder, a prompt set and seeds that fit it, when `log.eval_every` is on."""
    from animatediff_jax.io import fs

    lg = c.log
    _number(c, "log.eval_every", 0)
    if not lg.eval_every:
        return
    if not lg.eval_clip or not fs.isdir(lg.eval_clip):
        raise ConfigError(f"log.eval_clip={lg.eval_clip!r}: no such folder (a transformers CLIP folder, e.g. "
                          "openai/clip-vit-large-patch14, for log.eval_every)")
    prompts = tuple(lg.eval_prompts) or tuple(lg.sample_prompts)
    if not prompts:
        raise ConfigError("log.eval_every: no prompts to sample (set log.eval_prompts or log.sample_prompts)")
    seeds = tuple(lg.eval_seeds)
    if len(seeds) not in (0, 1, len(prompts)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                         for s in seeds):
        raise ConfigError(f"log.eval_seeds={seeds!r}: expected () or one non-negative integer for all prompts or "
                          f"one per prompt ({len(prompts)})")
    if not (c.model.vae and c.model.text_encoder):
        raise ConfigError("log.eval_every: sampling needs the VAE and the text encoder (model.vae / model.text_encoder)")


def check_batch(c: ConfigDict, divisor: int, processes: int = 1) -> None:
    """`train.batch_size` against the mesh's batch axes (`divisor`) and the processes."""
    b, acc = int(c.train.batch_size), int(c.train.grad_accum_steps)
    if b % (divisor * acc):
        raise ConfigError(f"train.batch_size={b} must be a multiple of {divisor * acc} (the mesh's batch axes "
                          f"{divisor} x train.grad_accum_steps {acc}; "
                          f"parallel.mesh_shape={dict(c.parallel.mesh_shape)})")
    check_processes(c, processes)


def check_processes(c: ConfigDict, processes: int) -> None:
    """`train.batch_size` against the number of processes (each feeds its own rows of every batch)."""
    b = int(c.train.batch_size)
    if b % processes:
        raise ConfigError(f"train.batch_size={b} must divide among {processes} processes")


def tiny_overrides(c: ConfigDict) -> ConfigDict:
    """CPU-sized runs: random tiny models, synthetic moving squares, toy tokenizer, fp32."""
    c.model.pretrained = ""
    c.model.size = "tiny"
    c.model.random_init = "fast"
    c.model.lora_rank = 4
    c.train.resolution = 16  # the tiny VAE halves it: 8x8 latents
    c.train.batch_size = 4
    c.train.steps = 200
    c.parallel.compute_dtype = "float32"
    c.data.source = "synthetic"
    c.data.synthetic_clips = 16
    c.data.tokenizer = "hash"
    c.data.read_threads = 1
    c.data.prefetch = 4
    c.checkpoint.every = 100
    c.log.every = 20
    c.log.sample_prompts = ("a red square moving left", "a blue square moving up")
    c.log.sample_steps = 10
    return c


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, no readable data, refused save): one line for the user;
    `animatediff-jax train` exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = int(exit_code)


class TrainingDiverged(TrainingError):
    """Too many non-finite steps in a row (`train.max_nonfinite_steps`)."""

    exit_code = 3
