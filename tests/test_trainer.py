"""Single-process tests of the training-loop hooks: RNG round trips, bit-exact restores."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_restore import RestoreError
from dist_restore.trainer import (
    TrainingState,
    get_rng_state,
    restore_training_state,
    resume_latest,
    save_training_state,
    set_rng_state,
)

pytestmark = pytest.mark.timeout(60)


def _draws() -> tuple[float, float, float, list[float], list[float]]:
    """Draws from every global RNG, including the cached Gaussians of random and numpy."""
    return (random.random(), random.gauss(0, 1), float(np.random.standard_normal()),
            np.random.rand(3).tolist(), torch.rand(3).tolist())


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _make(seed: int, *, extra_layer: bool = False) -> TrainingState:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)]
    if extra_layer:
        layers.append(torch.nn.Linear(3, 3))
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return TrainingState(models={"net": model}, optimizers={"sgd": opt}, schedulers={"lr": sched},
                         extra={"step": 0})


def _train(state: TrainingState, steps: int) -> None:
    model, opt, sched = state.models["net"], state.optimizers["sgd"], state.schedulers["lr"]
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 6)).square().mean().backward()
        opt.step()
        sched.step()
        state.extra["step"] += 1


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_rng_round_trip_through_checkpoint(tmp_path: Path) -> None:
    _seed_all(7)
    _draws()  # leave cached Gaussians (random.gauss_next, numpy has_gauss) in the states
    random.gauss(0, 1)
    np.random.standard_normal()
    state = TrainingState(extra={"step": 1})
    save_training_state(tmp_path / "ck", state)
    after_save = _draws()
    _seed_all(99)
    assert _draws() != after_save
    restore_training_state(tmp_path / "ck", state)
    assert _draws() == after_save


def test_rng_state_values_load_weights_only(tmp_path: Path) -> None:
    save_training_state(tmp_path / "ck", TrainingState())
    sd = torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)
    assert set(sd["rng"]) >= {"python", "torch", "numpy"}
    assert sd["rng"]["numpy"]["kind"] == "MT19937"
    set_rng_state(get_rng_state())  # the in-memory round trip too


def test_rng_false_neither_saves_nor_restores(tmp_path: Path) -> None:
    _seed_all(3)
    save_training_state(tmp_path / "ck", TrainingState(rng=False))
    assert "rng" not in torch.load(tmp_path / "ck" / "checkpoint_0.pt", weights_only=True)
    _seed_all(4)
    expected = _draws()
    _seed_all(4)
    restore_training_state(tmp_path / "ck", TrainingState(rng=False))
    assert _draws() == expected


def test_restore_into_fresh_objects_is_bit_exact(tmp_path: Path) -> None:
    src = _make(0)
    _train(src, 5)
    save_training_state(tmp_path / "step_5", src)
    dst = _make(1)
    params_before = [p.data_ptr() for p in dst.models["net"].parameters()]
    res = restore_training_state(tmp_path / "step_5", dst)
    assert res.missing_keys == [] and res.unexpected_keys == []
    # model tensors filled in place; buffers (running stats, num_batches_tracked) too
    assert [p.data_ptr() for p in dst.models["net"].parameters()] == params_before
    _assert_same_tensors(src.models["net"].state_dict(), dst.models["net"].state_dict())
    so, do = src.optimizers["sgd"].state_dict(), dst.optimizers["sgd"].state_dict()
    assert so["param_groups"] == do["param_groups"]
    assert so["state"].keys() == do["state"].keys()
    for i in so["state"]:
        _assert_same_tensors(so["state"][i], do["state"][i])
    assert dst.schedulers["lr"].last_epoch == src.schedulers["lr"].last_epoch == 5
    assert dst.schedulers["lr"].state_dict() == src.schedulers["lr"].state_dict()
    # and they keep training identically
    _seed_all(5)
    _train(src, 2)
    _seed_all(5)
    _train(dst, 2)
    _assert_same_tensors(src.models["net"].state_dict(), dst.models["net"].state_dict())


def test_adam_state_before_first_step_is_allocated(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_training_state(tmp_path / "ck", TrainingState(models={"m": m}, optimizers={"adam": opt}))
    m2 = torch.nn.Linear(4, 2)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    assert opt2.state_dict()["state"] == {}
    restore_training_state(tmp_path / "ck", TrainingState(models={"m": m2}, optimizers={"adam": opt2}))
    for i, s in opt.state_dict()["state"].items():
        _assert_same_tensors(s, opt2.state_dict()["state"][i])


def test_extra_is_updated_in_place(tmp_path: Path) -> None:
    src = TrainingState(extra={"step": 42, "epoch": 3, "name": "run-a", "best": 0.25,
                               "hist": [1, 2, 3], "t": torch.arange(4)})
    manifest = save_training_state(tmp_path / "ck", src)
    assert manifest is not None and manifest.metadata == {"step": 42}
    extra = {"step": 0, "kept": True}
    restore_training_state(tmp_path / "ck", TrainingState(extra=extra))
    assert extra["step"] == 42 and extra["epoch"] == 3 and extra["name"] == "run-a"
    assert extra["best"] == 0.25 and list(extra["hist"]) == [1, 2, 3] and extra["kept"] is True
    assert torch.equal(extra["t"], torch.arange(4))


def test_extra_values_keep_their_types(tmp_path: Path) -> None:
    """torch.Size, OrderedDict, dtype, device, complex, bytes, nested tuples in ``extra`` come
    back as torch.load gives them, type for type, with the models shared or not."""
    from _util import assert_same, value_types_sample

    for shared in (False, True):
        src = _make(0)
        src.extra.update(value_types_sample())
        save_training_state(tmp_path / f"ck{shared}", src)
        expected = torch.load(tmp_path / f"ck{shared}" / "checkpoint_0.pt", weights_only=True)["extra"]
        dst = _make(1)
        restore_training_state(tmp_path / f"ck{shared}", dst, shared_models=shared)
        assert_same(dst.extra, expected, "extra")
        assert dst.extra["shape"].numel() == 12


def test_strict_missing_model_key_raises_and_leaves_model_untouched(tmp_path: Path) -> None:
    save_training_state(tmp_path / "ck", _make(0))
    dst = _make(1, extra_layer=True)
    before = {k: v.clone() for k, v in dst.models["net"].state_dict().items()}
    with pytest.raises(RestoreError) as ei:
        restore_training_state(tmp_path / "ck", dst)
    assert ei.value.phase == "strict"
    assert "models.net.4.weight" in str(ei.value)
    _assert_same_tensors(before, dst.models["net"].state_dict())
    # strict=False: the rest is restored, the missing keys are reported (the optimizer's
    # param groups no longer fit the model, so leave it out)
    res = restore_training_state(tmp_path / "ck", TrainingState(models=dst.models), strict=False)
    assert sorted(res.missing_keys) == ["models.net.4.bias", "models.net.4.weight"]
    _assert_same_tensors({k: v for k, v in _make(0).models["net"].state_dict().items()},
                         {k: v for k, v in dst.models["net"].state_dict().items() if not k.startswith("4.")})


def test_strict_missing_section_raises(tmp_path: Path) -> None:
    src = _make(0)
    save_training_state(tmp_path / "ck", TrainingState(models=src.models))
    with pytest.raises(RestoreError, match="optimizers.sgd"):
        restore_training_state(tmp_path / "ck", _make(1))


def test_load_state_dict_failure_is_a_restore_error(tmp_path: Path) -> None:
    save_training_state(tmp_path / "ck", _make(0))
    dst = _make(1, extra_layer=True)
    with pytest.raises(RestoreError, match="parameter group") as ei:
        restore_training_state(tmp_path / "ck", dst, strict=False)
    assert ei.value.phase == "load"


def test_shape_mismatch_raises(tmp_path: Path) -> None:
    save_training_state(tmp_path / "ck", TrainingState(models={"m": torch.nn.Linear(4, 2)}))
    with pytest.raises(RestoreError, match="models.m.weight"):
        restore_training_state(tmp_path / "ck", TrainingState(models={"m": torch.nn.Linear(4, 3)}))


def test_resume_latest_picks_newest_or_none(tmp_path: Path) -> None:
    assert resume_latest(tmp_path / "nothing-yet", TrainingState()) is None
    state = _make(0)
    for _ in range(2):
        _train(state, 2)
        save_training_state(tmp_path / f"step_{state.extra['step']}", state)
    want = {k: v.clone() for k, v in state.models["net"].state_dict().items()}
    fresh = _make(1)
    res = resume_latest(tmp_path, fresh, shared_models=True)
    assert res is not None and fresh.extra["step"] == 4
    _assert_same_tensors(want, fresh.models["net"].state_dict())


def test_shared_model_names_take_the_prefix_rule(tmp_path: Path) -> None:
    """``shared_models=["net."]`` is ``["net"]``, as a prefix with its separator is everywhere."""
    state = _make(0)
    _train(state, 1)
    save_training_state(tmp_path / "ck", state)
    want = {k: v.clone() for k, v in state.models["net"].state_dict().items()}
    fresh = _make(1)
    res = restore_training_state(tmp_path / "ck", fresh, shared_models=["net."])
    _assert_same_tensors(want, fresh.models["net"].state_dict())
    assert res.report is not None and res.report.ok


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        restore_training_state("x", _make(0), shared_models=["nope"])
    with pytest.raises(TypeError, match="mapping"):
        TrainingState(models=torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state_dict"):
        TrainingState(optimizers={"o": object()})  # type: ignore[dict-item]


def _load_train_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "launch" / "train.py"
    spec = importlib.util.spec_from_file_location("_dist_restore_train_script", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_script_single_process_resume_is_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """launch/train.py without torchrun: stop after 3 steps, resume to 6, compare with 6 straight."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    train = _load_train_script()
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        common = ["--steps", "6", "--save-every", "3"]
        assert train.main([*common, "--ckpt-root", str(tmp_path / "a"), "--out", str(tmp_path / "a.pt")]) == 0
        assert train.main([*common, "--ckpt-root", str(tmp_path / "b"), "--stop-after", "3"]) == 0
        assert train.main([*common, "--ckpt-root", str(tmp_path / "b"), "--resume",
                           "--out", str(tmp_path / "b.pt")]) == 0
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert b["first_step"] == 4 and b["losses"][0] == {s: a["losses"][0][s] for s in (4, 5, 6)}
    _assert_same_tensors(a["model"], b["model"])
    for i, s in a["optimizer"]["state"].items():
        _assert_same_tensors(s, b["optimizer"]["state"][i])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.1)),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
])
def test_materialize_optimizer_state_leaves_parameters_and_grads_alone(make) -> None:
    from dist_restore._trainer_reshard import materialize_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    model.bias.grad = torch.full_like(model.bias, 2.0)  # a gradient the caller had
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make(model.parameters())
    lr = opt.param_groups[0]["lr"]
    materialize_optimizer_state(opt)
    assert len(opt.state) == 2 and all(opt.state[p] for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert opt.param_groups[0]["lr"] is lr
    assert model.weight.grad is None and torch.equal(model.bias.grad, torch.full_like(model.bias, 2.0))
    state = {id(v): v for st in opt.state.values() for v in st.values()}
    materialize_optimizer_state(opt)  # state exists: nothing happens
    assert {id(v) for st in opt.state.values() for v in st.values()} == set(state)


def test_strict_problems_forgive_missing_rng_only_without_an_own_file() -> None:
    from dist_restore._trainer_reshard import strict_problems

    rng = ["rng.torch", "rng.python.state"]
    assert strict_problems(rng, [], own_file=False) is None
    assert "rng.torch" in (strict_problems(rng, [], own_file=True) or "")
    msg = strict_problems(rng + ["models.net.w"], ["extra.x"], own_file=False) or ""
    assert "missing keys: 'models.net.w'" in msg and "unexpected keys: 'extra.x'" in msg and "rng" not in msg


def test_save_and_resume_latest_on_s3() -> None:
    """on_save / on_resume with an ``s3://`` root (moto's real S3 server): nothing to resume on
    an empty prefix; then the newest committed step, restored bit for bit."""
    from tests._s3 import s3_server

    with s3_server() as s3:
        root = s3.url("runs", "exp1")
        assert resume_latest(root, _make(3)) is None
        src = _make(0)
        _train(src, 3)
        save_training_state(f"{root}/step_3", src)
        _train(src, 2)
        save_training_state(f"{root}/step_5", src)
        s3.delete("runs/exp1/step_5/checkpoint_0.pt")  # step 5 lost its rank file: skipped
        src3 = _make(0)
        _train(src3, 3)
        dst = _make(1)
        res = resume_latest(root, dst)
        assert res is not None and res.missing_keys == [] and res.unexpected_keys == []
        _assert_same_tensors(src3.models["net"].state_dict(), dst.models["net"].state_dict())
        assert dst.extra["step"] == 3 and dst.schedulers["lr"].last_epoch == 3
        so, do = src3.optimizers["sgd"].state_dict(), dst.optimizers["sgd"].state_dict()
        for i in so["state"]:
            _assert_same_tensors(so["state"][i], do["state"][i])
