"""ENTK toolkit: exact kernels against brute-force Jacobians, Nystrom and trace estimators
against the exact kernel, target spectra on planted kernels, and the ``snr-dist entk`` job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from snr_dist.cli import main
from snr_dist.entk import (
    ENTKCallback,
    eigh_desc,
    entk,
    entk_matvec,
    entk_trace,
    full_to_matrix,
    hutchinson,
    hutchpp,
    nystrom_entk,
    record,
    target_spectrum,
)

DIGITS = Path(__file__).resolve().parent.parent / "configs" / "entk" / "digits.yaml"


def _mlp(seed: int = 0, d_in: int = 5, hidden: int = 7, d_out: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, d_out),
    ).double()


def _brute_jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Row i*C + c: d f_c(x_i) / d theta, one autograd.grad call per example and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        out = model(x[i : i + 1]).reshape(-1)
        for c in range(len(out)):
            grads = torch.autograd.grad(out[c], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_exact_entk_matches_brute_force_jacobians(chunk_size):
    model = _mlp()
    x = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac = _brute_jacobian(model, x)
    k = jac @ jac.T  # (n*C, n*C)
    n, c = 11, 3
    full = entk(model, x, mode="full", chunk_size=chunk_size)
    assert full.shape == (n, n, c, c)
    assert (full_to_matrix(full) - k).abs().max() < 1e-5
    trace = entk(model, x, mode="trace", chunk_size=chunk_size)
    k4 = k.reshape(n, c, n, c)
    assert trace.shape == (n, n)
    assert (trace - torch.einsum("icjc->ij", k4)).abs().max() < 1e-5
    diag = entk(model, x, mode="diagonal", chunk_size=chunk_size)
    assert diag.shape == (n, c)
    assert (diag - k.diagonal().reshape(n, c)).abs().max() < 1e-5
    # a cross-kernel against other points is the matching block of the brute-force kernel
    cross = entk(model, x[:7], x[7:], mode="full", chunk_size=chunk_size)
    assert (full_to_matrix(cross) - k[: 7 * c, 7 * c :]).abs().max() < 1e-5
    assert k.abs().max() > 1e-2  # the comparison is not between zeros


def test_entk_leaves_caller_grads_and_graph_alone():
    model = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    before = [p.grad.clone() for p in model.parameters()]
    entk(model, x, mode="trace")
    entk_matvec(model, x)(torch.ones(18, dtype=torch.float64))
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)
    loss.backward()  # the caller's graph is intact
    for p, g in zip(model.parameters(), before):
        assert torch.allclose(p.grad, 2 * g)


def test_matvec_matches_the_kernel_without_forming_it():
    model = _mlp()
    x = torch.randn(9, 5, dtype=torch.float64)
    kf = full_to_matrix(entk(model, x, mode="full"))
    kt = entk(model, x, mode="trace")
    v = torch.randn(27, 4, dtype=torch.float64)
    assert (entk_matvec(model, x, "full", chunk_size=4)(v) - kf @ v).abs().max() < 1e-10
    w = torch.randn(9, dtype=torch.float64)
    assert (entk_matvec(model, x, "trace", chunk_size=2)(w) - kt @ w).abs().max() < 1e-10
    with pytest.raises(ValueError, match="expected 27 rows"):
        entk_matvec(model, x)(torch.ones(5, dtype=torch.float64))


def test_bad_inputs_are_named():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode must be one of"):
        entk(model, x, mode="diag")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        entk(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="landmarks <= n = 4"):
        nystrom_entk(model, x, 9)
    with pytest.raises(ValueError, match="num_probes must be >= 3"):
        hutchpp(lambda v: v, 10, 2)
    # edge cases that used to give a bare StopIteration, meta tensors or a silent truncation
    with pytest.raises(ValueError, match="no trainable parameters"):
        entk(torch.nn.ReLU(), x)
    with torch.device("meta"):
        meta = _mlp()
    with pytest.raises(ValueError, match="meta device"):
        entk(meta, x)
    with pytest.raises(ValueError, match="landmark indices must be integers"):
        nystrom_entk(model, x, torch.tensor([1.9, 3.2]))
    ny = nystrom_entk(model, x, [0, 2])  # a list of indices is fine
    assert ny.landmarks.tolist() == [0, 2]
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        ny.eigh(-1)


def test_target_spectrum_of_a_rank_deficient_kernel_uses_its_range_only():
    """More points than parameters: the kernel has a null space whose eigenvectors are an
    arbitrary basis. The exact kernel's spectrum keeps its range only, as the Nystrom factor
    does, so reordering the points changes nothing and the two agree."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    model = model.double()
    x = torch.randn(60, 4, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (60,)), 3).double()
    seen = []
    for order in (torch.arange(60), torch.randperm(60, generator=torch.Generator().manual_seed(1))):
        out = record(model, x[order], y[order], mode="trace")
        ny = record(model, x[order], y[order], kernel="nystrom", landmarks=60, mode="trace")
        assert out["k90"] == ny["k90"]
        seen.append((out["k90"], out["clean_cumulative"][-1]))
    assert seen[0][0] == seen[1][0]
    assert seen[0][1] == pytest.approx(seen[1][1], abs=1e-9)


def test_nystrom_error_shrinks_with_landmarks_and_vanishes_at_n():
    model = _mlp(hidden=16, d_out=2)
    x = torch.randn(100, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    k = entk(model, x, mode="trace")
    norm = torch.linalg.matrix_norm(k)
    errors = {}
    for m in (5, 20, 60):
        errs = []
        for seed in range(4):
            ny = nystrom_entk(model, x, m, generator=torch.Generator().manual_seed(seed))
            errs.append(float(torch.linalg.matrix_norm(ny.matrix() - k) / norm))
        errors[m] = sum(errs) / len(errs)
    assert errors[5] > errors[20] > errors[60], errors
    assert errors[5] > 1e-2  # the kernel is not trivially low-rank
    full = nystrom_entk(model, x, torch.arange(100))
    assert float(torch.linalg.matrix_norm(full.matrix() - k) / norm) < 1e-6
    vals, vecs = full.eigh(5)  # eigenpairs from the factor agree with the exact kernel's
    exact_vals, _ = eigh_desc(k)
    assert torch.allclose(vals, exact_vals[:5], rtol=1e-6)
    assert torch.allclose(vecs.T @ vecs, torch.eye(5, dtype=vecs.dtype), atol=1e-8)


def test_hutchinson_is_unbiased_on_the_entk():
    model = _mlp()
    x = torch.randn(8, 5, dtype=torch.float64)
    exact = float(full_to_matrix(entk(model, x, mode="full")).trace())
    est = entk_trace(model, x, 600, "hutchinson", torch.Generator().manual_seed(0))
    assert est.num_probes == 600 and est.stderr > 0
    assert abs(est.estimate - exact) < 3 * est.stderr, (est, exact)
    assert est.stderr < 0.2 * exact  # the 3-sigma check above has teeth
    pp = entk_trace(model, x, 30, "hutch++", torch.Generator().manual_seed(0))
    assert abs(pp.estimate - exact) < 0.1 * exact


def test_hutchinson_mean_within_three_standard_errors_of_the_trace():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(50, 50, dtype=torch.float64, generator=g)
    a = a @ a.T
    est = hutchinson(lambda v: a @ v, 50, 4000, torch.Generator().manual_seed(6))
    assert abs(est.estimate - float(a.trace())) < 3 * est.stderr
    assert est.stderr < 0.05 * float(a.trace())


def test_hutchpp_beats_hutchinson_on_a_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(200, 5, dtype=torch.float64, generator=g))
    a = basis @ torch.diag(torch.tensor([50.0, 20, 10, 5, 1], dtype=torch.float64)) @ basis.T
    exact = float(a.trace())
    err = {"hutchinson": 0.0, "hutch++": 0.0}
    for seed in range(20):
        for name, fn in (("hutchinson", hutchinson), ("hutch++", hutchpp)):
            est = fn(lambda v: a @ v, 200, 18, torch.Generator().manual_seed(seed))
            err[name] += abs(est.estimate - exact) / 20
    assert err["hutch++"] < 0.1 * err["hutchinson"], err
    assert err["hutchinson"] > 0.5  # Hutchinson really is noisy here


def _planted(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return q


def test_target_spectrum_exact_on_a_planted_basis():
    n = 10
    u = _planted(n)
    # clean: column 0 = 3 u0 + u1, column 1 = u2 -> energies 9, 1, 1 on u0, u1, u2 (total 11)
    clean = torch.stack([3 * u[:, 0] + u[:, 1], u[:, 2]], dim=1)
    # noise: column 0 = 2 u1 + u5, column 1 = 2 u9 -> energies 4, 1, 4 on u1, u5, u9 (total 9)
    noise = torch.stack([2 * u[:, 1] + u[:, 5], 2 * u[:, 9]], dim=1)
    spec = target_spectrum(u, clean, clean + noise, eigvals=torch.arange(n, 0, -1.0))
    want_clean = [9 / 11, 10 / 11] + [1.0] * 8
    assert max(abs(a - b) for a, b in zip(spec.clean_cumulative, want_clean)) < 1e-6
    want_noise = [0, 4 / 9, 4 / 9, 4 / 9, 4 / 9, 5 / 9, 5 / 9, 5 / 9, 5 / 9, 1.0]
    assert max(abs(a - b) for a, b in zip(spec.noise_cumulative, want_noise)) < 1e-6
    assert spec.k90 == 2  # 10/11 = 0.909 is the first fraction >= 0.9
    assert abs(spec.reservoir_share - 5 / 9) < 1e-6
    assert abs(spec.random_share - 0.8) < 1e-12
    assert abs(spec.clean_outside - 1 / 11) < 1e-6
    assert spec.noise_k90 == 10
    assert abs(spec.clean_energy - 11) < 1e-6 and abs(spec.noise_energy - 9) < 1e-6
    assert spec.eigvals[0] == 10.0 and spec.dim == n == spec.num_eigvecs
    json.dumps(spec.to_dict())  # JSON-ready
    # exactly 90% on the first eigenvector counts as reached (rounding slack)
    on_edge = target_spectrum(u, (3 * u[:, 0] + u[:, 3]).unsqueeze(1))
    assert on_edge.k90 == 1 and on_edge.noise_cumulative is None
    assert on_edge.reservoir_share is None


def test_target_spectrum_full_layout_and_truncated_basis():
    n, c = 4, 3
    u = _planted(n * c, seed=1)
    y = (2 * u[:, 4] + u[:, 7]).reshape(n, c)  # (n, C) in the i*C + c layout
    spec = target_spectrum(u, y)
    assert spec.dim == 12 and spec.k90 == 8
    assert abs(spec.clean_cumulative[4] - 0.8) < 1e-6
    # only the top 6 eigenvectors known: fractions stay relative to the total energy
    trunc = target_spectrum(u[:, :6], y, y + u[:, 0].reshape(n, c))
    assert abs(trunc.clean_cumulative[-1] - 0.8) < 1e-6
    assert trunc.k90 is None and trunc.reservoir_share is None
    assert abs(trunc.noise_cumulative[0] - 1.0) < 1e-6
    with pytest.raises(ValueError, match="do not fit eigenvectors of dimension 12"):
        target_spectrum(u, torch.ones(5, 3))


def test_record_and_callback_on_a_real_model():
    model = _mlp(d_out=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    noisy = torch.where(torch.arange(40) % 3 == 0, (y + 1) % 4, y)
    onehot = torch.nn.functional.one_hot(y, 4).double()
    rec = record(model, x, onehot, torch.nn.functional.one_hot(noisy, 4).double())
    k = entk(model, x, mode="trace")
    vals, vecs = eigh_desc(k)
    want = target_spectrum(vecs, onehot, torch.nn.functional.one_hot(noisy, 4).double())
    assert rec["k90"] == want.k90 and abs(rec["reservoir_share"] - want.reservoir_share) < 1e-9
    assert abs(rec["trace"] - float(k.trace())) < 1e-8 * float(k.trace())
    assert rec["eigvals"][0] == pytest.approx(float(vals[0]))
    model.train()
    cb = ENTKCallback(x, y, noisy, num_classes=4, n_points=30, kernel="nystrom", landmarks=30)
    first = cb.record(model, epoch=0)
    assert model.training  # mode restored
    assert len(cb.indices) == 30 and first["epoch"] == 0 and first["kernel"] == "nystrom"
    exact = record(
        model,
        x[cb.indices],
        onehot[cb.indices],
        torch.nn.functional.one_hot(noisy[cb.indices], 4).double(),
    )
    assert first["k90"] == exact["k90"]  # Nystrom with m = n is the exact kernel
    assert abs(first["reservoir_share"] - exact["reservoir_share"]) < 1e-6
    cb(model, epoch=1)
    assert [h["epoch"] for h in cb.history] == [0, 1]
    assert "k90=" in ENTKCallback.summary(first)


def _tiny_config(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(DIGITS.read_text())
    raw["name"] = "tiny"
    raw["data"]["n_points"] = 24
    raw["model"]["hidden"] = [16]
    raw["training"].update(epochs=2, record_every=1, batch_size=256)
    raw["kernel"]["chunk_size"] = 10
    for key, value in changes.items():
        section, field = key.split(".")
        raw[section][field] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_entk_command_writes_json_and_png(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    rc = main(["entk", "--config", str(cfg), "--output-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = tmp_path / "tiny"
    payload = json.loads((out / "entk.json").read_text())
    assert [r["epoch"] for r in payload["records"]] == [0, 1, 2]
    for rec in payload["records"]:
        for key in (
            "k90",
            "reservoir_share",
            "random_share",
            "clean_cumulative",
            "noise_cumulative",
            "trace",
            "eigvals",
            "test_acc",
            "memorised",
            "step",
        ):
            assert key in rec, key
        assert len(rec["clean_cumulative"]) == 24 and rec["dim"] == 24
        assert math.isclose(rec["clean_cumulative"][-1], 1.0, rel_tol=1e-9)
    assert payload["config"]["kernel"]["method"] == "exact"
    assert payload["flipped_in_subset"] > 0
    png = (out / "entk.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "reservoir share=" in capsys.readouterr().out


def test_entk_command_nystrom_at_init_only(tmp_path):
    cfg = _tiny_config(
        tmp_path, **{"training.epochs": 0, "kernel.method": "nystrom", "kernel.landmarks": 8}
    )
    assert main(["entk", "--config", str(cfg), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    payload = json.loads((tmp_path / "tiny" / "entk.json").read_text())
    assert [r["epoch"] for r in payload["records"]] == [0]
    assert payload["records"][0]["num_eigvecs"] <= 8


@pytest.mark.parametrize(
    "override, expected",
    [
        ("kernel.methd=exact", ["kernel.methd", "unknown key", "method"]),
        ("kernel.method=lanczos", ["kernel.method", "'lanczos'", "'exact' or 'nystrom'"]),
        ("training.epochs=-1", ["training.epochs = -1", "greater than or equal to 0"]),
        ("training.optimizer=sgd", ["training.optimizer", "'sgd'", "'snr_adamw'"]),
        ("data.n_points=1", ["data.n_points = 1", "greater than or equal to 2"]),
        ("kernel.landmarks=500", ["kernel.landmarks (500)", "data.n_points (200)"]),
        # more points than the training split holds (it used to be capped without a word)
        ("data.n_points=5000", ["data.n_points = 5000", "the training split has 1348 points"]),
    ],
)
def test_entk_command_rejects_bad_configs_naming_the_key(tmp_path, capsys, override, expected):
    if override.startswith("kernel.landmarks"):
        override_args = ["--set", "kernel.method=nystrom", "--set", override]
    else:
        override_args = ["--set", override]
    rc = main(["entk", "--config", str(DIGITS), "--output-dir", str(tmp_path), *override_args])
    assert rc == 2
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not any(tmp_path.iterdir())  # failed before any work


def test_entk_json_stays_strict_json_when_training_diverges(tmp_path):
    """lr 1e6 makes the weights non-finite in the first epoch: training stops there (a NaN
    kernel has no eigendecomposition) and entk.json stays strict JSON, null and not NaN (which
    jq and JSON.parse reject)."""
    args = ["entk", "--config", str(DIGITS), "--output-dir", str(tmp_path), "--no-progress"]
    for item in (
        "training.epochs=1",
        "training.lr=1e6",
        "data.n_points=20",
        "kernel.chunk_size=20",
    ):
        args += ["--set", item]
    assert main(args) == 0
    text = next(tmp_path.rglob("entk.json")).read_text()
    payload = json.loads(text, parse_constant=lambda c: pytest.fail(f"entk.json holds {c}"))
    assert payload["diverged_in_epoch"] == 1  # stopped there; the record at init is kept
    assert [r["epoch"] for r in payload["records"]] == [0]
