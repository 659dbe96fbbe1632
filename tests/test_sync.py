"""qlora-sync without a W&B server: which `wandb sync` commands it would run (--dry-run), and a
stand-in wandb executable (--wandb-command) that syncs, fails, or exits 0 without syncing."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from qlora_exp.cli.sync import main
from qlora_exp.errors import ExitCode

# Stands in for `wandb sync FOLDER...`: marks each folder's .wandb file synced the way wandb does
# (run-ID.wandb.synced), except run ids starting "fail" (exit 1) and "nomark" (exit 0, nothing
# marked: wandb's behaviour when it is not logged in). A run id starting "wait" waits for a run
# whose id starts "go" to have started, so it succeeds only if both run at once.
STUB = """
import sys, time
from pathlib import Path
folders = [Path(arg) for arg in sys.argv[2:]]
assert sys.argv[1] == "sync", sys.argv
for folder in folders:
    run_id = folder.name.rsplit("-", 1)[1]
    (folder.parent.parent.parent / f"started-{run_id}").write_text("")
    if run_id.startswith("wait"):
        deadline = time.time() + 30
        while not list(folder.parents[2].glob("started-go*")):
            if time.time() > deadline:
                sys.exit("gave up waiting: the runs were not synced in parallel")
            time.sleep(0.05)
    if run_id.startswith("fail"):
        print("wandb: ERROR upload failed: 500 Internal Server Error")
        sys.exit(1)
    if not run_id.startswith("nomark"):
        for log in folder.glob("run-*.wandb"):
            log.with_name(log.name + ".synced").write_text("")
"""


def offline_run(parent: Path, run_id: str, started: str = "20260101_000000") -> Path:
    """An offline W&B run folder as wandb leaves it in PARENT/wandb."""
    folder = parent / "wandb" / f"offline-run-{started}-{run_id}"
    folder.mkdir(parents=True)
    (folder / f"run-{run_id}.wandb").write_bytes(b"records")
    latest = parent / "wandb" / "latest-run"
    latest.unlink(missing_ok=True)
    latest.symlink_to(folder.name)  # wandb's own link: not a second run
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Jobs (one resumed: two folders of one run; one already synced) and the comparison run."""
    root = tmp_path / "sweep"
    offline_run(root / "lora.r=4", "aaa")
    offline_run(root / "lora.r=8", "bbb")
    offline_run(root / "lora.r=8", "bbb", started="20260102_000000")
    synced = offline_run(root / "lora.r=16", "ccc")
    (synced / "run-ccc.wandb.synced").write_text("")
    offline_run(root, "cmp")
    return root


def stub(tmp_path: Path) -> str:
    script = tmp_path / "wandb_stub.py"
    script.write_text(STUB)
    return shlex.join([sys.executable, str(script)])


def dry_run(sweep: Path, capsys: pytest.CaptureFixture[str]) -> list[list[str]]:
    main([str(sweep), "--dry-run", "--wandb-command", "wandb"])
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_dry_run_lists_every_unsynced_run_once(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def folder(job: str, run_id: str, started: str = "20260101_000000") -> str:
        return str(sweep / job / "wandb" / f"offline-run-{started}-{run_id}")

    assert sorted(dry_run(sweep, capsys)) == sorted(
        [
            ["wandb", "sync", folder("lora.r=4", "aaa")],
            ["wandb", "sync", folder("lora.r=8", "bbb"), folder("lora.r=8", "bbb", "20260102_000000")],
            ["wandb", "sync", str(sweep / "wandb" / "offline-run-20260101_000000-cmp")],
        ]
    )
    assert not list(sweep.rglob("*.synced"))[1:]  # nothing ran: only the one marker made above


def test_sync_marks_runs_synced_and_a_rerun_skips_them(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([str(sweep), "--jobs", "2", "--wandb-command", stub(tmp_path)])
    assert len(list(sweep.rglob("run-*.wandb.synced"))) == 5  # every folder of the four runs, and ccc's
    assert dry_run(sweep, capsys) == []


def test_runs_sync_in_parallel(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    offline_run(root / "a", "wait1")
    offline_run(root / "b", "go1")
    main([str(root), "--jobs", "2", "--wandb-command", stub(tmp_path)])  # with --jobs 1 wait1 gives up
    assert len(list(root.rglob("*.synced"))) == 2


FAILURES = [
    ("fail01", "exit 1: wandb: ERROR upload failed: 500"),
    ("nomark01", "wandb sync exited 0 but did not mark"),  # e.g. wandb not logged in
]


@pytest.mark.parametrize("failure", FAILURES, ids=[run_id for run_id, _ in FAILURES])
def test_a_failing_sync_is_reported_and_exits_non_zero(
    sweep: Path,
    tmp_path: Path,
    failure: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_id, reported = failure
    offline_run(sweep / "lora.r=32", run_id)
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--wandb-command", stub(tmp_path)])
    assert exit_info.value.code == ExitCode.SYNC_FAILED
    assert f"run {run_id} did not sync: {reported}" in caplog.text
    assert f"1 of 4 runs did not sync: {run_id}" in caplog.text
    # the other runs synced; a rerun tries the failed one only
    assert [command[2:] for command in dry_run(sweep, capsys)] == [
        [str(sweep / "lora.r=32" / "wandb" / f"offline-run-20260101_000000-{run_id}")]
    ]


def test_a_directory_without_offline_runs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no offline W&B runs" in capsys.readouterr().err
