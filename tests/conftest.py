import atexit
import gc
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

import probflow as pf

# Every test process (each xdist worker, and the probflow commands it starts) gets its own JAX
# persistent compilation cache: the CLI turns the cache on in-process, and a cache shared with
# other test runs or the user's own (written while it is read) must not leak into the suite.
os.environ["PROBFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="probflow-test-cache-")
atexit.register(shutil.rmtree, os.environ["PROBFLOW_CACHE_DIR"], ignore_errors=True)

_CACHE_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                   "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes", "jax_logging_level")


#: Drop this worker's compiled programs once it holds this many memory mappings.
MAX_MAPPINGS = 30000


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _compiled_programs_bounded():
    """XLA:CPU maps every compiled program's code into memory (a U-Net solve: about a thousand
    mappings), and nothing unmaps it while JAX's caches hold the program. A worker that ran a
    few hundred tests reached Linux's vm.max_map_count (65530) and crashed inside XLA's compiler
    (SIGSEGV). Past MAX_MAPPINGS, drop the compiled programs between tests."""
    yield
    if _mappings() > MAX_MAPPINGS:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(autouse=True)
def _cache_settings_restored():
    """A test that runs a `probflow` command in-process turns JAX's persistent cache on (as the
    command line does) for the rest of this worker's life; put the settings back after it, so that
    every test compiles as it would in a fresh process."""
    from probflow import _program_store

    old = {k: getattr(jax.config, k) for k in _CACHE_SETTINGS}
    old_store = _program_store.program_store()
    yield
    if _program_store.program_store() != old_store:
        if old_store is None:
            _program_store.close_program_store()
        else:
            _program_store.open_program_store(old_store)
    new = {k: getattr(jax.config, k) for k in _CACHE_SETTINGS}
    if new != old:
        from jax.experimental.compilation_cache import compilation_cache

        for k, v in old.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def mixture2d():
    """A 2-d, two-component mixture with correlated covariances."""
    return pf.GaussianMixture(
        [0.3, 0.7],
        [[-1.0, 0.5], [1.5, -0.5]],
        [np.eye(2) * 0.3, [[0.5, 0.2], [0.2, 0.4]]],
    )


ALL_SDES = [pf.VPSDE(), pf.SubVPSDE(), pf.VESDE()]
SDE_IDS = ["vp", "subvp", "ve"]


@pytest.fixture(params=ALL_SDES, ids=SDE_IDS)
def sde(request):
    return request.param


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restoring the previous setting afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


# The default suite (`-m 'not slow'`) must finish within 10 minutes on 2 CPU cores. These tests
# each took 5-26 s there and repeat what a default test already checks (another solver, SDE or
# parameter of the same property, or the same command through another path); they run with
# `pytest -m slow`. Keyed by node id without the `tests/` prefix.
SLOW = {
    # another parameter of a property the default suite checks
    "test_ode.py::test_nfe_matches_host_counter[Dopri8-None]",
    "test_ode.py::test_nfe_matches_host_counter[Bosh3-None]",
    "test_ode.py::test_nfe_matches_host_counter[Tsit5-9]",
    "test_ode.py::test_nfe_matches_host_counter[Midpoint-9]",
    "test_ode.py::test_nfe_matches_host_counter[ReversibleHeun-None]",
    "test_ode.py::test_nfe_matches_host_counter[LeapfrogMidpoint-9]",
    "test_ode.py::test_nfe_matches_host_counter[Dopri8-5]",
    "test_ode.py::test_float64_matches_closed_form_to_1e_6[ve]",
    "test_ode.py::test_hutchinson_is_unbiased[gaussian]",
    "test_ode.py::test_sample_ode_moments[ve]",
    "test_options.py::test_ode_options_equal_keywords_bit_for_bit[bosh3]",
    "test_fewstep.py::test_order_of_convergence[unipc2-bh2-noise]",
    "test_fewstep.py::test_order_of_convergence[unipc3]",
    "test_dpm.py::test_log_snr_time_and_adaptive",
    "test_dpm.py::test_order_of_convergence_on_mixture[DPMSolver-1]",
    "test_dpm.py::test_order_of_convergence_on_mixture[DPMSolverMultistep-2]",
    "test_dpm.py::test_order_of_convergence_on_mixture[DPMSolver-3]",  # order 3: [..Multistep-3]
    "test_dpm.py::test_closed_form_single_gaussian[subvp]",  # the closed form: [vp]
    "test_fewstep.py::test_nfe_matches_host_counter_on_unet[deis]",  # on the U-Net: [unipc3]
    "test_dpm.py::test_nfe_matches_host_counter[DPMSolver-7-t]",
    "test_dpm.py::test_nfe_matches_host_counter[DPMSolver-4-log_snr]",
    "test_dpm.py::test_nfe_matches_host_counter[DPMSolverMultistep-5-t]",
    "test_dpm.py::test_nfe_matches_host_counter[DPMSolver-None-t]",  # adaptive: [..-None-log_snr]
    "test_fewstep.py::test_nfe_matches_host_counter_on_unet[unipc2-bh2-noise]",  # UniPC: [unipc3]
    "test_samplers.py::test_samplers_match_mixture[sde-euler-subvp]",
    "test_samplers.py::test_samplers_match_mixture[pc-rd-langevin-subvp]",
    "test_divergence.py::test_vector_field_matches_dense_jacobian[jvp-ve]",
    "test_divergence.py::test_vector_field_matches_dense_jacobian[jvp-subvp]",
    "test_divergence.py::test_vector_field_matches_dense_jacobian[vjp-subvp]",
    "test_controllable.py::test_smc_inpainting_samples_the_exact_conditional[ve]",
    "test_nfe.py::test_half_solver_nfe[tsit5]",
    "test_refill.py::test_exact_trace_matches_closed_form_and_lockstep[sqrt_t]",
    "test_refill.py::test_exact_trace_matches_closed_form_and_lockstep[log_snr]",
    "test_paper_configs.py::test_small_variant_runs_and_checkpoints[ddpmpp]",
    "test_paper_configs.py::test_small_variant_runs_and_checkpoints[ncsnpp]",
    "test_fewstep.py::test_unipc_matches_paper[2-bh2-noise-full]",
    "test_ode.py::test_hutchinson_is_unbiased[rademacher]",
    # g stays zero without scale corrections: also asserted by the slow
    # test_defaults_from_8_steps_beat_2m_on_held_out_latents (the default from 8 steps on)
    "test_tuned_solver.py::test_without_scale_corrections_g_stays_zero",
    "test_samplers.py::test_samplers_match_mixture[sde-euler-ve]",
    "test_divergence.py::test_vector_field_matches_dense_jacobian[vjp-ve]",
    "test_score_sde.py::test_reproduces_the_papers_scores[ve_celebahq_256-flax]",
    *(f"test_loss.py::test_loss_matches_closed_form[eager-likelihood-{w}-{sde}]"
      for w in ("True", "False") for sde in ("vp", "subvp", "ve")),
    "test_dpm.py::test_likelihood_matches_closed_form[subvp-dpm3]",
    "test_elbo.py::test_exact_score_is_tight_and_a_wrong_score_is_above[subvp]",
    "test_elbo.py::test_exact_score_is_tight_and_a_wrong_score_is_above[ve]",
    "test_loss.py::test_importance_sampled_times_follow_g2_over_std2[vp]",
    "test_loss.py::test_importance_sampled_times_follow_g2_over_std2[subvp]",
    "test_fewstep.py::test_unipc_matches_reference_code[unipc_2_bh2_data_time_quadratic]",
    "test_fewstep.py::test_unipc_matches_paper[3-bh1-data-lof]",  # its reference-code test stays
    "test_ode.py::test_nfe_matches_host_counter[Tsit5-None]",
    # covered by another default test on the same code path (measured 15-20 s each)
    "test_ode.py::test_sqrt_time_change_is_exact",  # sqrt(t) likelihoods: test_options, test_refill
    "test_ode.py::test_encode_decode_round_trip_and_scipy_latent",  # test_dpm's round trip
    "test_controllable.py::test_inpainted_digits_are_recognised",  # exact conditionals stay
    "test_refill.py::test_unet_batch_independence_and_host_count",  # mixture refill tests stay
    "test_cli_train.py::test_train_resume_and_bpd",  # test_train's resume test stays
    "test_ode.py::test_bad_input",  # test_bad_input.py's one-line errors stay
    "test_samplers.py::test_samplers_match_mixture[pc-ancestral-annealed-ve]",
    "test_cli_paper.py::test_raw_weights_differ_from_the_ema_weights",
    "test_dpm.py::test_nfe_matches_host_counter[DPMSolver-None-log_snr]",
    "test_ode.py::test_nfe_matches_host_counter[Dopri5-None]",
    "test_refill.py::test_nfe_against_host_counter[Heun]",
    "test_fewstep.py::test_order_of_convergence[deis3]",
    "test_fewstep.py::test_ipndm_and_deis_match_paper[3]",
    "test_fewstep.py::test_ipndm_and_deis_match_reference_code[4]",  # [2], [3] and paper's [4]
    "test_options.py::test_ode_options_equal_keywords_bit_for_bit[heun10]",
    "test_dpm.py::test_order_of_convergence_on_mixture[DPMSolver-2]",
    "test_dpm.py::test_closed_form_single_gaussian[ve]",
    "test_controllable.py::test_exact_classifier_gives_exact_component_samples[subvp]",
    "test_fewstep.py::test_unipc_matches_paper[1-bh1-data-lof]",
    "test_fewstep.py::test_unipc_matches_reference_code[unipc_3_bh2_noise_logSNR]",
    "test_ode.py::test_nfe_matches_host_counter[Heun-None]",
    "test_score_sde.py::test_float64_matches_the_papers_float64_scores[ve_celebahq_256]",
    *(f"test_failures.py::{test}[colorize]"
      for test in ("test_exploding_model_names_where_it_failed",
                   "test_nan_model_fails_at_once_with_one_line")),
    "test_ode.py::test_float64_matches_closed_form_to_1e_6[subvp]",
    "test_ode.py::test_sample_ode_moments[subvp]",
    "test_fewstep.py::test_unipc_matches_paper[3-bh2-noise-lof]",
    "test_fewstep.py::test_unipc_matches_paper[3-bh1-noise-full]",
    "test_fewstep.py::test_unipc_matches_reference_code[unipc_2_bh1_noise_logSNR]",
    "test_fewstep.py::test_unipc_matches_reference_code[unipc_1_bh1_data_logSNR]",
    "test_fewstep.py::test_unipc_matches_reference_code[unipc_1_bh2_noise_time_quadratic]",
    "test_fewstep.py::test_ipndm_and_deis_match_paper[1]",
    "test_fewstep.py::test_ipndm_and_deis_match_paper[2]",
    "test_samplers.py::test_samplers_match_mixture[pc-rd-langevin-ve]",
    "test_samplers.py::test_samplers_match_mixture[pc-em-none-subvp]",
    *(f"test_score_sde.py::test_reproduces_the_papers_scores[{case}]"
      for case in ("edited_fir_noconv-flax", "edited_pyramid_nofir-flax",
                   "edited_output_skip-flax", "ve_ffhq_1024-flax", "ve_ncsnpp_deep-flax",
                   "vp_ncsnpp_deep-flax", "subvp_ddpmpp_deep-flax", "vp_ddpmpp-flax")),
    *(f"test_failures.py::{test}[{case}]"
      for test in ("test_exploding_model_names_where_it_failed",
                   "test_nan_model_fails_at_once_with_one_line")
      for case in ("inpaint-smc", "decode-adaptive", "sample_sde-adaptive", "sample_conditional",
                   "sample_sde-shark")),
    # statistical or end-to-end checks whose parts have their own default tests
    "test_divergence.py::test_estimators_are_unbiased_and_ordered",
    "test_models.py::test_layouts_compute_the_same_function",
    "test_nfe.py::test_bits_per_dim_rejected_first_steps_unet",
    "test_elbo.py::test_digits_unet_elbo_above_ode",
    "test_tune.py::test_tuned_schedule_beats_default_on_held_out_latents",
    "test_tune.py::test_tune_sweep",
    "test_curves.py::test_nfe_curve_on_mixture",
    "test_score_sde.py::test_bits_per_dim_float32_agrees_with_float64",
    "test_tune.py::test_tuner_objective_is_the_solve",
    "test_classifier.py::test_noise_conditional_classifier_matches_exact_posterior",
    "test_divergence.py::test_control_variate_and_rademacher_are_exact_for_diagonal_gaussian_data",
    "test_divergence.py::test_probe_and_dequantization_noise_match_reruns_on_the_same_images",
    "test_divergence.py::test_dpm_solvers_carry_one_divergence_per_probe",
    "test_refill.py::test_bits_per_dim_schedules_by_default",
    "test_refill.py::test_results_independent_of_batch_and_slots",
    "test_fewstep.py::test_edm_heun_order_two",
    "test_classifier.py::test_clean_classifier_reaches_bayes_accuracy",
    "test_tune.py::test_nfe_curve_with_tuned_schedules",
    "test_models.py::test_deep_unet_has_enough_keys",
    "test_failures.py::test_bad_input_values_are_value_errors",  # test_bad_input.py: NaN data
    "test_models.py::test_score_is_minus_network_over_std",
    "test_models.py::test_fourier_frequencies_are_not_trained",
    "test_checkpoint.py::test_pretrained_loads_with_x64",
    # the same command through another path
    "test_cli_tools.py::test_compilation_cache_makes_the_second_run_load_instead_of_compile",
    "test_cli_tools.py::test_bpd_repeats_and_probes",
    "test_cli_tools.py::test_colorize",
    "test_cli_tools.py::test_demo_quick",  # the demo: measured by hand (docs/benchmarks.md)
    "test_cli_tools.py::test_inpaint_and_masks",
    "test_cli_paper.py::test_encode_records_the_config_and_decode_uses_it",
    "test_compilation_cache.py::test_second_process_compiles_nothing",
    "test_cli_tools.py::test_sample_all_samplers",
    "test_cli_tools.py::test_train_classifier",
    "test_cli_tools.py::test_encode_then_decode",
    "test_cli_paper.py::test_bpd_takes_the_models_data_range_and_256_bins",
    "test_multiprocess.py::test_duplicate_process_ids",
    "test_cli_tools.py::test_user_mistakes_print_one_line",  # test_bad_input.py: bad commands
    "test_fewstep.py::test_nfe_matches_host_counter_on_unet[ipndm]",  # U-Net: [unipc3]
    # Levy area: [SpaceTimeLevyArea]
    "test_samplers.py::test_unchecked_tree_is_diffraxs_tree[SpaceTimeTimeLevyArea]",
    # EDM with churn: test_edm_matches_paper[max-churn] (Algorithm 2, the same draws)
    "test_fewstep.py::test_edm_churn_samples_the_mixture",
}


#: The modules that took longest (2 workers, 2 cores), in that order. With `--dist loadfile`
#: each worker takes the next module when it is done, so starting with the longest ones
#: leaves short modules to even out the end of the run.
LONGEST_FIRST = ["test_fewstep.py", "test_ode.py", "test_failures.py", "test_options.py",
                 "test_multiprocess.py", "test_refill.py", "test_score_sde.py", "test_dpm.py",
                 "test_controllable.py", "test_samplers.py", "test_divergence.py",
                 "test_models.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
    found = set()
    for item in items:
        key = item.nodeid.removeprefix("tests/")
        if key in SLOW:
            item.add_marker(pytest.mark.slow)
            found.add(key)
    whole = {config.rootpath, config.rootpath / "tests"}
    if all(Path(a).resolve() in whole for a in config.args):  # the whole suite was collected
        missing = SLOW - found
        if missing:  # a renamed test must not leave its entry behind
            raise pytest.UsageError(f"conftest.SLOW names tests that do not exist: {missing}")

