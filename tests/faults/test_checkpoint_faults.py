"""Run folders and checkpoints under attack: re-used folders, damaged, edited and hostile files, a
resume of the wrong policy, leftovers of a killed writer, permissions."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from fault_helpers import assert_one_message, run_cli, tiny_overrides

from scd_policy.policies import CheckpointError, load_policy
from scd_policy.training.checkpoint import list_checkpoints, resumable_checkpoint
from scd_policy.training.experiment import compose_experiment, run_training

pytestmark = pytest.mark.slow


def _steps(run_dir: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run_dir)]


def _latest(run_dir: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return result


def test_rerun_into_a_used_folder_is_refused_and_the_old_run_is_untouched(
    dataset: Path, run_copy: Path, tmp_path: Path
) -> None:
    # The defect: re-running without resume wrote step 3, pruned it at once (name order), left
    # latest.json pointing at nothing and best/ from the old run.
    before = {p.relative_to(run_copy): p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file()}
    result = run_cli("scd-train", *tiny_overrides(dataset, run_copy, 3), cwd=tmp_path)
    assert_one_message(result, str(run_copy), "already holds a training run", "train.resume=true", "out=")
    after = {p.relative_to(run_copy): p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file()}
    assert after == before
    load_policy(run_copy / "checkpoints" / "step_00000004" / "policy")


def test_pruning_orders_by_step_number_not_by_name(dataset: Path, tmp_path: Path) -> None:
    # Names of 9 digits (step >= 1e8) sort before 8-digit ones as text.
    folder = tmp_path / "named" / "checkpoints"
    for name in ("step_100000000", "step_99999999", "step_00000005", "step_00000005.corrupt"):
        (folder / name).mkdir(parents=True)
    assert _steps(tmp_path / "named") == [5, 99_999_999, 100_000_000]
    run_dir = tmp_path / "run"
    run_training(compose_experiment(tiny_overrides(dataset, run_dir, 6)))
    assert _steps(run_dir) == [4, 6]
    assert _latest(run_dir)["name"] == "step_00000006"


def test_truncated_train_state_falls_back_to_the_newest_intact_checkpoint(
    dataset: Path, run_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = run_copy / "checkpoints" / "step_00000004" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        run_training(compose_experiment(tiny_overrides(dataset, run_copy, 6, "train.resume=true")))
    assert "train_state.pt does not match its checksum" in caplog.text
    assert "resuming from" in caplog.text and "step_00000002" in caplog.text
    # The damaged folder is kept aside, never trusted, never deleted; the run went on from step 2.
    assert (run_copy / "checkpoints" / "step_00000004.corrupt" / "train_state.pt").exists()
    assert _latest(run_copy)["step"] == 6
    load_policy(run_copy / "checkpoints" / "step_00000006" / "policy")


@pytest.mark.parametrize("damaged", ["raw.safetensors", "policy/model.safetensors"])
def test_zeroed_weights_are_detected_on_resume(dataset: Path, run_copy: Path, damaged: str) -> None:
    path = run_copy / "checkpoints" / "step_00000004" / damaged
    data = bytearray(path.read_bytes())
    data[-100:] = bytes(100)  # the defect: this loaded silently
    path.write_bytes(bytes(data))
    if damaged.startswith("policy"):
        with pytest.raises(CheckpointError, match="does not match the checksum"):
            load_policy(path.parent)
    assert resumable_checkpoint(run_copy) == run_copy / "checkpoints" / "step_00000002"


def test_every_checkpoint_damaged_says_so(run_copy: Path) -> None:
    for _, path in list_checkpoints(run_copy):
        (path / "raw.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .* fresh out="):
        resumable_checkpoint(run_copy)
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("*.corrupt")) == [
        "step_00000002.corrupt",
        "step_00000004.corrupt",
    ]


def test_edited_config_is_refused_before_allocating(run_copy: Path) -> None:
    folder = run_copy / "checkpoints" / "step_00000004" / "policy"
    record = json.loads((folder / "config.json").read_text())
    record["config"]["d_model"] = 65536  # the defect: allocated ~17 GB before looking at the weights
    (folder / "config.json").write_text(json.dumps(record))
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"does not match the network its config\.json describes"):
        load_policy(folder)
    assert time.perf_counter() - started < 30  # refused from the header, not after building 17 GB


def test_latest_pointing_outside_the_run_folder_is_refused(run_copy: Path, tmp_path: Path) -> None:
    pointer = run_copy / "checkpoints" / "latest.json"
    pointer.write_text(json.dumps({"name": "../../../etc", "step": 4}))
    result = run_cli("scd-eval", f"checkpoint={run_copy}", "episodes=1", cwd=tmp_path)
    assert_one_message(result, "latest.json", "'../../../etc'", "not a step folder of this run")


def test_corrupt_latest_json_on_resume_falls_back(dataset: Path, run_copy: Path) -> None:
    (run_copy / "checkpoints" / "latest.json").write_text("{not json")
    run_training(compose_experiment(tiny_overrides(dataset, run_copy, 6, "train.resume=true")))
    assert _latest(run_copy)["step"] == 6


def test_wrong_policy_type_on_resume_names_both(dataset: Path, run_copy: Path, tmp_path: Path) -> None:
    config_before = (run_copy / "config.yaml").read_text()
    args = tiny_overrides(dataset, run_copy, 6, "policy=diffusion_policy", "train.resume=true")
    result = run_cli("scd-train", *args, cwd=tmp_path)
    assert_one_message(result, "holds a 'scd' policy", "policy=diffusion_policy", "resume with policy=scd")
    assert (run_copy / "config.yaml").read_text() == config_before


def test_stale_temporaries_are_cleaned_and_files_honour_the_umask(dataset: Path, run_copy: Path) -> None:
    # What a kill -9 in the middle of a checkpoint write leaves behind.
    leftover = run_copy / "checkpoints" / ".step_00000006.abc123.tmp"
    (leftover / "policy").mkdir(parents=True)
    (run_copy / "checkpoints" / ".latest.json.xyz.tmp").write_text("{}")
    old_umask = os.umask(0o022)
    try:
        run_training(compose_experiment(tiny_overrides(dataset, run_copy, 6, "train.resume=true")))
    finally:
        os.umask(old_umask)
    assert not list((run_copy / "checkpoints").glob(".*.tmp"))
    step = run_copy / "checkpoints" / "step_00000006"
    # Before: 0600 / 0700 whatever the umask, so nobody else could read a shared checkpoint.
    assert stat.S_IMODE((step / "policy" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((step / "train_state.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE(step.stat().st_mode) == 0o755


def test_out_is_a_file(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.txt"
    out.write_text("notes")
    result = run_cli("scd-train", *tiny_overrides(dataset, out, 2), cwd=tmp_path)
    assert_one_message(result, f"out={out} is a file")
    assert out.read_text() == "notes"


def test_invalid_value_in_a_policy_config_names_it(run_copy: Path, tmp_path: Path) -> None:
    folder = run_copy / "checkpoints" / "step_00000004" / "policy"
    record = json.loads((folder / "config.json").read_text())
    record["config"]["horizon"] = -3
    (folder / "config.json").write_text(json.dumps(record))
    result = run_cli("scd-eval", f"checkpoint={folder}", "task=reach_around", "episodes=1", cwd=tmp_path)
    assert_one_message(result, "scd-eval: error:", "config.json has an invalid config", "horizon")
