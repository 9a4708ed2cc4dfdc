"""Shared test setup: fp32 everywhere, a persistent compile cache, seeded torch."""

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (tests/test_compile.py compiles for abstract TPU chips) holds a lock file per process; the
# two xdist workers and the benches' subprocesses may each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The tests' tiny models spend their time in XLA's CPU compiler: backend optimisation level 0 compiles
# ~30% faster (the fast tier: 120 s -> 86 s on 2 cores) and runs a little slower, which only the toy
# world's sampling notices. It changes no compared result (every tolerance holds; both sides of a
# bit-exact comparison compile alike). Subprocesses get it through `xla_flags`.
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys([*os.environ.get("XLA_FLAGS", "").split(),
                                                  "--xla_backend_optimization_level=0"]))

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(*flags: str) -> str:
    """`XLA_FLAGS` for a test's subprocess: the fast compile plus `flags` (e.g. a host device count)."""
    return " ".join((FAST_COMPILE, *flags))


def assert_close(ours, ref, rtol: float = 1e-5, atol: float = 1e-5, what: str = ""):
    """Compares against the PyTorch reference and reports the max error (relative to the ref's scale)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    err = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    assert np.isfinite(ours).all(), f"{what}: non-finite output"
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    assert err <= atol + rtol * scale, f"{what}: max abs err {err:.3g} (ref max {scale:.3g})"
    return err


@pytest.fixture
def small_attention_blocks(monkeypatch):
    """`attention="chunked"` in blocks of 16 queries x 24 keys, so the tiny models' 64-token
    sequences span several uneven blocks (padding and masking exercised)."""
    import functools

    from animatediff_jax.models import attention

    monkeypatch.setattr(attention, "chunked_attention",
                        functools.partial(attention.chunked_attention, block_q=16, block_k=24))


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


# CI runs the suite on two workers (`pytest -n 2`, README): each file stays on one worker (its module
# fixtures are built once), and the files that hold real-size models share one worker, so two of them
# never sit in the 24 GiB at once (test_real_size alone peaks at ~15 GiB).
HEAVY = {"test_real_size.py", "test_sd15_released.py", "test_memory_bench.py", "test_train_memory.py",
         "test_clip_vision.py", "test_clip_text.py", "test_controlnet.py"}
# The groups go to the workers longest first (setup.cfg turns off xdist's own order, which is by number of
# tests: it left the one-test groups of 1.5 min, test_sharding and test_multihost, to the end, one worker
# idle meanwhile). Seconds per group, measured with `--durations` on 2 cores (2026-12-07, a cold compilation cache;
# test_compile / test_quantize / test_sdxl_sampling plus the tests added 2026-12-08, estimated); a group not
# listed goes after these, in collection order.
GROUP_SECONDS = {"real-size": 300, "test_toy.py": 296, "test_fault_tolerance.py": 185, "test_steering.py": 171,
                 "test_compile.py": 230, "test_training.py": 117, "test_sharding.py": 96, "test_multihost.py": 96,
                 "test_sampling.py": 82, "test_parity.py": 63, "test_unet.py": 56, "test_sample_cli.py": 70,
                 "test_sdxl_training.py": 110, "test_sdxl_sampling.py": 140, "test_quantize.py": 140,
                 "test_sdxl_unet.py": 80, "test_sdxl_load.py": 45, "test_hotshot.py": 40, "test_sdxl_text.py": 30,
                 "test_control_sampling.py": 55, "test_readme.py": 45, "test_train_bench.py": 44,
                 "test_resume.py": 38, "test_export.py": 38, "test_remote_paths.py": 38, "test_interrupts.py": 31,
                 "test_ip_adapter.py": 31, "test_prepare.py": 30}


# The fast tier, `python -m pytest -q -m "not slow" tests` (CONTRIBUTING.md): what is slow is marked
# here, not in the test files. A whole file (real size, several processes), or tests by function name
# (every parametrisation) or by node name (`name[params]`: one parametrisation). Measured one by one
# on 2 CPU cores with `--durations`: a test over ~3 s goes here, and so do the users of a module
# fixture that costs more than ~5 s (a training or sampling run, models built in diffusers); each
# file keeps its quick tests.
SLOW_FILES = {"test_real_size.py", "test_multihost.py", "test_sdxl_sampling.py", "test_sdxl_training.py",
              "test_sdxl_load.py"}
SLOW_TESTS = {
    "test_attention.py": {
        "test_chunked_gradient_memory", "test_chunked_inside_flax_module", "test_chunked_under_vmap",
        "test_splash_shard_map_two_devices", "test_chunked_matches_xla[300-300-40-False]",
        "test_chunked_matches_xla[300-300-80-True]", "test_chunked_matches_xla[300-300-160-False]",
        "test_chunked_matches_xla[200-77-40-True]", "test_chunked_matches_xla[77-300-80-True]",
        "test_chunked_matches_xla[256-256-40-False]", "test_splash_interpret_matches_xla[200-200-40-False-128]",
        "test_splash_interpret_matches_xla[200-200-160-True-128]",
        "test_splash_interpret_matches_xla[200-128-40-True-128]"},
    "test_bad_weights.py": {"test_a_damaged_converted_base_is_named_as_the_base"},
    "test_clip_text.py": {
        "test_sd15_forward_matches_transformers", "test_tiny_last_hidden_state_matches_transformers",
        "test_encode_prompts_matches_diffusers_encode_prompt", "test_clip_skip_zero_and_none_are_the_last_layer",
        "test_bf16_compute_stays_close", "test_tiny_clip_skip_matches_hidden_states_path[1]"},
    "test_clip_vision.py": {
        "test_vit_l14_architecture_matches_transformers", "test_tiny_text_with_projection_matches_transformers",
        "test_tiny_vision_with_projection_matches_transformers", "test_preprocess_matches_clip_image_processor_exactly",
        "test_tiny_clip_model_matches_transformers_end_to_end"},
    "test_compile.py": {
        "test_stage2_step_compiles_on_a_v5e_2x2_data_x_fsdp_mesh", "test_per_chip_state_shrinks_with_fsdp",
        "test_sampler_with_splash_and_a_controlnet_compiles_for_v5e_2x2_with_context_parallelism",
        "test_the_command_fits_and_does_not_fit",
        "test_compile_sample_reads_the_config_files_that_are_here", "test_tpu_probes_still_compile",
        "test_frames_major_probe_is_the_motion_module"},
    "test_control_sampling.py": {  # `pipes`: diffusers' control pipelines
        "test_controlnets_match_animatediff_controlnet_pipeline",
        "test_sparsectrl_matches_animatediff_sparse_controlnet_pipeline", "test_control_errors_are_one_line",
        "test_sample_config_image_to_video_and_controlnet", "test_sample_config_control_errors"},
    "test_controlnet.py": {  # `tiny_cn`: a diffusers ControlNet
        "test_sd15_controlnet_real_architecture", "test_real_size_layouts", "test_unet_with_residuals_vs_diffusers",
        "test_sparsectrl_vs_diffusers", "test_sparsectrl_diffusers_norms", "test_controlnet_vs_diffusers",
        "test_diffusers_folders", "test_controlnet11_single_file", "test_bad_files"},
    "test_convert_cli.py": {  # `sd_folder`: an SD1.5 folder written by diffusers
        "test_convert_writes_identical_params_and_configs", "test_converted_folder_loads_without_torch",
        "test_convert_refuses_an_existing_out_and_never_writes_its_input", "test_convert_motion_and_lora",
        "test_motion_params_file_loads_without_torch", "test_convert_motion_lora_errors"},
    "test_data.py": {"test_cache_roundtrip_matches_direct_encoding",
                     "test_pipeline_workers_give_the_same_batches_and_resume"},
    "test_embeddings.py": {"test_prompt_embeddings_match_diffusers_load_textual_inversion",
                           "test_sample_config_loads_them"},
    "test_evaluation.py": {  # `world`: a sample run with CLIP metrics
        "test_sample_writes_metrics", "test_evaluate_command_on_a_sample_folder", "test_evaluate_command_errors",
        "test_sample_safety_checker_blacks_flagged_videos", "test_sample_config_checks",
        "test_training_logs_clip_metrics"},
    "test_export.py": {
        "test_motion_lora_export_in_diffusers", "test_motion_export_loads_in_diffusers",
        "test_a_module_for_another_model_size_names_base_config", "test_position_table_is_torchs",
        "test_round_trips_bit_exact"},
    "test_export_safety.py": {"test_a_write_that_fails_leaves_the_previous_output",
                              "test_existing_output_needs_overwrite_and_the_input_is_never_replaced"},
    "test_fault_tolerance.py": {  # `straight`: a training run through the CLI
        "test_divergence_stops_with_one_line_and_saves_nothing_nonfinite",
        "test_signal_saves_exits_0_and_resumes_bit_exact",
        "test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_resumed",
        "test_checkpoint_missing_files_are_damage", "test_checkpoint_of_another_config_is_refused_not_moved",
        "test_checkpoint_of_another_process_count_is_refused_not_moved",
        "test_rotation_never_deletes_the_last_intact_checkpoint", "test_webvid_with_a_wrong_folder_fails_fast",
        "test_prepare_with_nothing_readable_is_an_error"},
    "test_interrupts.py": {"test_sample_interrupted_while_denoising", "test_sample_interrupted_while_compiling"},
    "test_ip_adapter.py": {  # `env`: diffusers' AnimateDiffPipeline with IP-Adapters
        "test_matches_animatediff_pipeline", "test_two_adapters_travel_and_block_scales_match"},
    "test_lora.py": {"test_init_lora_targets_and_identity", "test_motion_lora_original_runtime_and_merged",
                     "test_motion_lora_diffusers_formats", "test_kohya", "test_round_trips"},
    "test_memory_bench.py": {"test_memory_bench_small", "test_train_program_differentiates_the_training_steps_loss"},
    "test_motion_formats.py": {"test_original_file_parity", "test_renaming_matches_diffusers", "test_errors"},
    "test_motion_norms.py": {"test_export_says_it_or_refuses", "test_sample_pipeline_runs_the_files_norms"},
    "test_parity.py": {  # `pipes`: diffusers' AnimateDiffPipeline
        "test_tiny_parity_with_animatediff_pipeline", "test_tiny_parity_with_chunked_attention", "test_cli_tiny",
        "test_stochastic_samplers_are_refused"},
    "test_prepare.py": {"test_two_processes_and_a_killed_run_write_the_same_cache",
                        "test_latent_dtypes_and_the_clip_of_each_record",
                        "test_workers_give_the_threads_batches_and_resume_across_worker_counts"},
    "test_programs.py": {"test_validations_through_the_real_trainer_keep_device_memory_constant"},
    "test_prompt_weights.py": {"test_a_weighted_word_moves_the_video_more", "test_weighted_long_prompts_match_the_rule",
                               "test_travel_pads_every_text_to_the_same_chunks"},
    "test_readme.py": {"test_readme_example_runs"},
    "test_remote_paths.py": {"test_prepare_then_train_and_resume_in_the_bucket",
                             "test_sample_with_every_file_in_the_bucket", "test_convert_and_export_in_the_bucket"},
    "test_resume.py": {  # `runs`: two training runs through the CLI
        "test_resume_is_bit_exact", "test_checkpoints_kept_logged_and_validated", "test_interrupted_save_is_ignored"},
    "test_safety.py": {"test_flags_and_black_images_match_diffusers[released-naming]"},
    "test_sample_cli.py": {  # `run`: a sample run through the CLI
        "test_bench_small_tiny_runs", "test_context_windows_length_override_runs_windows",
        "test_cli_help_and_print_config", "test_load_pipeline_merges_like_lora_merge",
        "test_bad_input_one_line_error_before_compiling[motion_fit]", "test_sample_writes_generates_frames",
        "test_replaying_a_saved_run_reproduces_its_frames", "test_int8_from_the_files_users_have"},
    "test_sampling.py": {  # `pipe`: the tiny pipeline, compiled
        "test_sharded_over_8_devices_equals_single_device", "test_windowed_prediction_averages_overlaps",
        "test_generate_compiles_once_and_matches_its_parts", "test_scan_equals_python_loop_and_reports_progress",
        "test_long_video_needs_and_uses_windows"},
    "test_schedulers.py": {
        "test_few_step_configs_use_their_model_cards_scheduler[animatelcm.py]",
        "test_few_step_configs_use_their_model_cards_scheduler[lightning.py:2]",
        "test_default_ddim_is_the_original_animatediff_scheduler[current-3]",
        "test_sampling_loop_matches_diffusers[lcm-4-19]", "test_sampling_loop_matches_diffusers[lcm-7-20]",
        "test_sampling_loop_matches_diffusers[pndm-7-17]", "test_sampling_loop_matches_diffusers[pndm-25-16]",
        "test_sampling_loop_matches_diffusers[ddim-7-2]", "test_sampling_loop_matches_diffusers[ddim-25-0]",
        "test_sampling_loop_matches_diffusers[ddim-25-4]", "test_sampling_loop_matches_diffusers[ddim-7-5]"},
    "test_sd15.py": {"test_partial_file_takes_the_rest_from_base", "test_diffusers_folder[safetensors]",
                     "test_sd15_size_layout_is_the_compvis_one"},
    "test_sd15_released.py": {"test_published_sd15_folder_at_real_size"},
    "test_sharding.py": {"test_sharded_step_equals_single_device"},
    "test_steering.py": {  # `reference`: diffusers' UNetMotionModel
        "test_sample_config_prompt_travel_and_motion_scale", "test_generate_with_free_init_is_diffusers",
        "test_video_to_video_is_diffusers", "test_a_context_per_frame",
        "test_motion_scope_windows_are_diffusers_free_noise",
        "test_pe_stretch_is_animatediff_evolveds", "test_generate_with_prompt_travel_is_diffusers_free_noise",
        "test_generate_with_free_noise_windows", "test_motion_scale", "test_motion_scale_names_the_blocks",
        "test_video_to_video_keeps_the_video_at_low_strength"},
    "test_toy.py": {"test_pixel_vae_is_identity_in_flax_and_diffusers", "test_shipped_checkpoint_moves_as_prompted",
                    "test_shipped_checkpoint_travels_between_prompts",
                    "test_shipped_video_to_video_keeps_the_track_at_low_strength", "test_shipped_motion_lora_zooms",
                    "test_demo_quick_runs_every_stage"},
    "test_quantize.py": {"test_int8_products_stay_int8_on_tpu", "test_25_step_sample_with_int8_stays_near_bf16",
                         "test_unet_quantizes_spatial_layers_only", "test_int8_flops_counted_from_the_optimised_program",
                         "test_int8_on_a_trained_model_moves_frames_less_than_bf16_does"},
    "test_sdxl_text.py": {"test_released_sdxl_text_layout", "test_tiny_bigg_tower_matches_transformers"},
    "test_sdxl_unet.py": {"test_spatial_unet_matches_unet2d", "test_motion_unet_matches_unet_motion_model",
                          "test_real_size_layout", "test_family_mismatch_is_one_line",
                          "test_export_motion_adapter_loads_in_diffusers",
                          "test_adapter_and_original_files_load_to_the_same_params"},
    "test_hotshot.py": {"test_unet_matches_reference", "test_real_size_layout", "test_mismatch_is_one_line",
                        "test_temporal_layer_matches_reference"},
    "test_sdxl_lora.py": {"test_sdxl_kohya_lora_merges_like_torch_and_diffusers"},
    "test_train_bench.py": {"test_train_bench_tiny"},
    "test_train_memory.py": {"test_runtime_lora_equals_merged_fp32", "test_runtime_lora_survives_bf16_base",
                             "test_fsdp_gathers_per_layer_in_bf16"},
    "test_training.py": {  # `trained`: a short run of each stage
        "test_loss_goes_down", "test_frozen_params_bit_identical", "test_bf16_compute_fp32_params",
        "test_nonfinite_step_leaves_params_and_optimizer_state_unchanged",
        "test_a_saved_step_is_loaded_instead_of_compiled"},
    "test_training_parts.py": {"test_a_train_run_validates_its_config_once"},
    "test_unet.py": {"test_per_block_remat_changes_nothing_but_memory", "test_original_numerics[v1]",
                     "test_original_numerics[v2]", "test_original_numerics_with_chunked_attention",
                     "test_norm_semantics_matter"},
    "test_vae.py": {"test_sd15_size_encode_decode"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` / `-k` deselect: every item gets its marks
def pytest_collection_modifyitems(config, items):
    unmatched = {}
    group = {}
    for item in items:
        name = os.path.basename(str(item.fspath))
        group[item] = "real-size" if name in HEAVY else name
        item.add_marker(pytest.mark.xdist_group(group[item]))
        slow = SLOW_TESTS.get(name, ())
        left = unmatched.setdefault(name, set(slow))
        for key in (item.name, getattr(item, "originalname", item.name)):
            if key in slow:
                left.discard(key)
        if name in SLOW_FILES or item.name in slow or getattr(item, "originalname", item.name) in slow:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -GROUP_SECONDS.get(group[item], 0))  # (stable: collection order within a group)
    if not any("::" in str(a) for a in config.args):  # whole files collected: a stale name is a renamed test
        for name, left in unmatched.items():
            if left:
                warnings.warn(f"tests/conftest.py SLOW_TESTS[{name!r}] names no test: {sorted(left)}")
