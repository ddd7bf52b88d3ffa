"""What `snr-dist train` and `snr-dist experiment` do with what a previous run left: resume only
what the same configuration wrote, keep the last results when a run fails, finish a checkpoint
swap a kill cut short, and read past a torn study record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from snr_dist import SNRAdamW
from snr_dist import checkpoint as ckpt
from snr_dist.cli import main
from snr_dist.experiments import trainer
from snr_dist.experiments.config import ConfigError, load_config
from snr_dist.experiments.study import load_study, run_study
from snr_dist.experiments.trainer import World, run_experiment

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
SMALL = [
    "model.hidden=[16]",
    "train.epochs=2",
    "train.seeds=[0]",
    "train.eval_every=1",
    "train.checkpoint_every=1",
]


def _train(out: Path, *overrides: str) -> int:
    args = ["train", "--config", QUICKSTART, "--output-dir", str(out), "--no-progress"]
    for item in [*SMALL, *overrides]:
        args += ["--set", item]
    return main(args)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resuming_another_configuration_is_refused_before_anything_changes(tmp_path, capsys):
    assert _train(tmp_path) == 0
    run_dir = tmp_path / "quickstart"
    kept = {f: (run_dir / f).read_bytes() for f in ("metrics.jsonl", "report.md")}
    capsys.readouterr()
    assert _train(tmp_path, "data.label_noise=0.0", "optimizers.1.lr=0.05") == 2
    err = capsys.readouterr().err
    assert err.startswith("snr-dist: ")
    assert "data.label_noise: 0.4 then, 0.0 now" in err
    assert "--set train.resume=false" in err
    for f, before in kept.items():
        assert (run_dir / f).read_bytes() == before, f
    # growing train.epochs resumes (epochs 1-2 come from the checkpoint)
    assert _train(tmp_path, "train.epochs=3") == 0
    assert "SNRAdamW seed 0: resumed after epoch 2" in capsys.readouterr().out
    assert [(r["optimizer"], r["epoch"]) for r in _records(run_dir)] == [
        (o, e) for o in ("AdamW", "SNRAdamW") for e in (1, 2, 3)
    ]
    # an option a later release adds is not a difference (the older record cannot have it)
    for f in (run_dir / "checkpoints").glob("*.config.json"):
        record = json.loads(f.read_text())
        del record["optimizer"]["lr"]
        f.write_text(json.dumps(record))
    assert _train(tmp_path, "train.epochs=3") == 0
    # and train.resume=false starts over, under the new configuration
    assert _train(tmp_path, "data.label_noise=0.0", "train.resume=false") == 0
    assert _train(tmp_path, "data.label_noise=0.0", "train.epochs=3") == 0


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    """Checkpoints of a release without the configuration record: the checkpoint's own check
    refuses them, as a command-line error."""
    assert _train(tmp_path) == 0
    for f in (tmp_path / "quickstart" / "checkpoints").glob("*.config.json"):
        f.unlink()
    capsys.readouterr()
    assert _train(tmp_path, "model.hidden=[8]") == 2
    err = capsys.readouterr().err
    assert err.startswith("snr-dist: ") and "shape" in err
    assert "Traceback" not in err


def test_a_failed_run_leaves_the_previous_results(tmp_path, monkeypatch):
    assert _train(tmp_path) == 0
    run_dir = tmp_path / "quickstart"
    before = (run_dir / "metrics.jsonl").read_bytes()
    real = trainer.train_run

    def second_run_fails(cfg, ocfg, *args, **kw):
        if ocfg.name == "SNRAdamW":
            raise RuntimeError("stopped")
        return real(cfg, ocfg, *args, **kw)

    monkeypatch.setattr(trainer, "train_run", second_run_fails)
    with pytest.raises(RuntimeError, match="stopped"):
        _train(tmp_path, "train.resume=false")
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    partial = (run_dir / "metrics.jsonl.partial").read_text().splitlines()
    assert [json.loads(x)["optimizer"] for x in partial] == ["AdamW", "AdamW"]


def test_a_batch_smaller_than_one_micro_batch_per_rank_is_refused():
    cfg = load_config(QUICKSTART, ["train.batch_size=1", *SMALL])
    with pytest.raises(ConfigError, match=r"train.batch_size = 1: .* must be >= 2"):
        run_experiment(cfg, None, progress=False, world=World(rank=0, size=2))


def _checkpoint(path: Path, lr: float) -> None:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, lr)
    ckpt.save(path, model, SNRAdamW(model.parameters(), lr=lr), step=int(lr * 10))


@pytest.mark.parametrize("left", ["old_and_tmp", "old"])
def test_a_save_cut_between_its_renames_is_settled_on_load(tmp_path, left):
    """``save`` swaps a finished checkpoint in with two renames: the previous one to
    ``.old``, the new one from ``.tmp``. Cut between them, the newest complete one is used."""
    path = tmp_path / "ck"
    _checkpoint(path, 0.1)  # the previous checkpoint
    path.rename(path.with_name("ck.old"))
    if left == "old_and_tmp":
        _checkpoint(tmp_path / "new", 0.2)
        (tmp_path / "new").rename(path.with_name("ck.tmp"))
    model = torch.nn.Linear(3, 2)
    step = ckpt.load(path, model, SNRAdamW(model.parameters(), lr=0.3))
    want = 0.2 if left == "old_and_tmp" else 0.1
    assert step == int(want * 10)
    assert torch.allclose(model.weight, torch.full((2, 3), want))
    assert (path / ckpt.META).is_file()


def test_a_torn_study_record_is_left_out_and_rerun(tmp_path, capsys):
    path = ROOT / "configs/experiments/convergence.yaml"
    cfg = load_study(path, ["seeds=[0]", "methods.1.weight_decay=[0.1]"], smoke=True)
    cfg = cfg.model_copy(update={"workers": 1})
    first = run_study(cfg, tmp_path, progress=False)
    results = tmp_path / "results.jsonl"
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    again = run_study(cfg, tmp_path, progress=True)
    assert "1 incomplete record(s) left out" in capsys.readouterr().out
    assert again.keys() == first.keys()
    assert [json.loads(x) for x in results.read_text().splitlines()]  # every line whole
    shutil.rmtree(tmp_path)


def _ds_json(tmp_path: Path, block: dict) -> str:
    cfg = json.loads((ROOT / "configs" / "deepspeed" / "zero0.json").read_text())
    cfg["snr_preconditioner"] = block
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize(
    "block, overrides, words",
    [
        # the JSON asks for the cross-sample estimator, the YAML has one micro-batch per step
        ({"estimator": "cross_sample"}, [], ["'SNRAdamW'", "train.microbatches >= 2"]),
        # each part valid alone: snr_beta 0 is allowed for the cross-sample estimator only
        (
            {"estimator": "temporal"},
            ["optimizers.1.snr.estimator=cross_sample", "optimizers.1.snr.snr_beta=0"],
            ["do not go together", "estimator='temporal'", "snr_beta"],
        ),
    ],
    ids=["cross_sample_one_microbatch", "merged_options_clash"],
)
def test_deepspeed_json_problems_are_command_line_errors_before_any_work(
    tmp_path, capsys, block, overrides, words
):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    out = tmp_path / "out"
    args = ["train", "--config", QUICKSTART, "--deepspeed", _ds_json(tmp_path, block)]
    args += ["--output-dir", str(out), "--no-progress"]
    for item in [*SMALL, "train.microbatches=2" if overrides else "train.microbatches=1"]:
        args += ["--set", item]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("snr-dist: ") and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()  # nothing was started


def test_experiment_workers_must_be_positive(tmp_path, capsys):
    for bad in ("0", "-1"):
        rc = main(
            [
                "experiment",
                "convergence",
                "--smoke",
                "--workers",
                bad,
                "--output-dir",
                str(tmp_path),
            ]
        )
        assert rc == 2
        assert f"--workers {bad}: allowed: an int >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _stop_columns(run_dir: Path) -> list[tuple]:
    return [
        (r["optimizer"], r["epoch"], r["stop_ratio"], r["stop_step"]) for r in _records(run_dir)
    ]


def test_the_stop_monitor_resumes_as_if_uninterrupted_and_can_end_a_run(tmp_path):
    """``train.stop_monitor``: every run (AdamW too) records the monitor's reading; a resumed
    run reads what the uninterrupted one does (its state is saved beside the checkpoint);
    "stop" ends a run at the first evaluation after it fires; the report shows the columns."""
    assert _train(tmp_path / "whole", "train.epochs=40", "model.hidden=[32]") == 0
    whole = _stop_columns(tmp_path / "whole" / "quickstart")
    assert all(r[2] is not None for r in whole)
    assert _train(tmp_path / "cut", "train.epochs=25", "model.hidden=[32]") == 0
    assert _train(tmp_path / "cut", "train.epochs=40", "model.hidden=[32]") == 0
    assert _stop_columns(tmp_path / "cut" / "quickstart") == whole
    report = (tmp_path / "whole" / "quickstart" / "report.md").read_text()
    assert "stop monitor: step" in report and "test acc at the stop" in report
    fired = {r[0]: r[3] for r in whole if r[3] is not None}
    assert fired, "the monitor fired in neither run: pick a setting where it does"
    name, step = next(iter(fired.items()))
    assert (
        _train(tmp_path / "stop", "train.epochs=40", "model.hidden=[32]", "train.stop_monitor=stop")
        == 0
    )
    stopped = [r for r in _stop_columns(tmp_path / "stop" / "quickstart") if r[0] == name]
    assert stopped[-1][3] == step and len(stopped) < 40  # ended at the evaluation after it
    assert _train(tmp_path / "none", "train.stop_monitor=none") == 0
    assert all("stop_ratio" not in r for r in _records(tmp_path / "none" / "quickstart"))
