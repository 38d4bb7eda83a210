"""FusedAdam/FusedAdamW behave as torch.optim.Adam/AdamW where a user meets them: torch's own optimizer test
inputs (``torch.testing._internal.common_optimizers.optim_db``, shipped in the torch wheel), old checkpoints,
Adam state loaded into AdamW, ``torch.distributed.checkpoint`` both ways, master weights and the user's own
writes to a param, ``differentiable=True``, duplicate params. Each compares with torch.optim itself."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from support import (
    DEVICE,
    assert_close_relative,
    assert_optimizers_match,
    backend_params,
    new_grads,
    random_tensor,
    seeded_generator,
)

from adam_gpu import FusedAdam, FusedAdamW

try:
    from torch.testing._internal import common_optimizers
except Exception as error:  # (torch's internal test module: a future torch may drop or move it)
    common_optimizers = None
    MISSING = f"torch.testing._internal.common_optimizers cannot be imported here: {error!r}"

OURS = {"Adam": FusedAdam, "AdamW": FusedAdamW}


def _optim_infos() -> list:
    if common_optimizers is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=MISSING))]
    infos = [info for info in common_optimizers.optim_db if info.optim_cls.__name__ in OURS]
    return [pytest.param(info, id=info.optim_cls.__name__) for info in infos]


def _configs(info) -> list:
    """Every optim_inputs_func config with the global cliquey kwargs (foreach, fused, differentiable) torch adds."""
    return common_optimizers._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("info", _optim_infos())
def test_every_config_of_torchs_optimizer_tests_steps_as_torch(info, backend):
    generator = seeded_generator("optim_db", info.optim_cls.__name__, backend)
    for config in _configs(info):
        kwargs = dict(config.kwargs)
        if kwargs.get("differentiable") and backend != "torch":
            continue  # (differentiable runs torch's own step: the torch backend alone names it)
        params = [random_tensor(generator, *shape) for shape in [(3, 5), (7,), (1,)]]
        twins = [p.clone() for p in params]
        if kwargs.get("differentiable"):  # (non-leaf params: their updates are recorded)
            params = [p.requires_grad_().clone() for p in params]
            twins = [t.requires_grad_().clone() for t in twins]
        ours = OURS[info.optim_cls.__name__](params, backend=backend, **kwargs)
        theirs = info.optim_cls(twins, **kwargs)
        for _ in range(4):
            new_grads(generator, params, twins)
            ours.step()
            theirs.step()
        with torch.no_grad():
            assert_optimizers_match(ours, theirs, params, twins)


@pytest.mark.parametrize("info", _optim_infos())
def test_every_error_input_of_torchs_optimizer_tests_raises_as_torch(info):
    """Each construction error torch's tests expect from Adam/AdamW comes from ours alike (type, message). The
    one difference (README): a param listed twice in a group, where torch warns, is refused with a ValueError."""
    inputs = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert inputs, "torch's tests list no error inputs"
    for error_input in inputs:
        optimizer_input = error_input.optimizer_error_input
        params = optimizer_input.params
        if params is None:
            params = [torch.randn(2, 2, requires_grad=True)]
        if error_input.error_on != common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            continue  # (step-time inputs: none for Adam/AdamW in this torch)
        cls = OURS[info.optim_cls.__name__]
        if issubclass(error_input.error_type, Warning):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(ValueError, match="cannot have duplicate parameters"):
                    cls(params, **optimizer_input.kwargs)
            continue
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            cls(params, **optimizer_input.kwargs)


def test_without_torchs_internal_test_module_the_file_skips():
    """The skip reason exists for a torch without the module; here it imports."""
    assert common_optimizers is not None, MISSING


# ---- checkpoints ----


def _trained(optimizer_cls, params: list[torch.Tensor], generator: torch.Generator, steps: int = 3, **options):
    optimizer = optimizer_cls(params, lr=1e-2, **options)
    for _ in range(steps):
        for param in params:
            param.grad = random_tensor(generator, *param.shape)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("backend", backend_params())
def test_a_checkpoint_whose_step_is_a_number_loads_and_continues_as_torch(backend):
    """torch before 1.12 saved ``step`` as a number; torch.optim loads it as a tensor."""
    generator = seeded_generator("number step", backend)
    params = [random_tensor(generator, 4, 3)]
    saved = _trained(torch.optim.AdamW, [p.clone() for p in params], generator).state_dict()
    saved["state"][0]["step"] = float(saved["state"][0]["step"])
    ours = FusedAdamW([p.clone() for p in params], lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW([p.clone() for p in params], lr=1e-2)
    ours.load_state_dict(copy.deepcopy(saved))
    theirs.load_state_dict(saved)
    ours_params, their_params = ours.param_groups[0]["params"], theirs.param_groups[0]["params"]
    for _ in range(2):
        new_grads(generator, ours_params, their_params)
        ours.step()
        theirs.step()
    assert_optimizers_match(ours, theirs, ours_params, their_params)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("source", [torch.optim.Adam, FusedAdam], ids=["torch-adam", "fused-adam"])
def test_an_adam_state_dict_loaded_into_fused_adamw_decays_decoupled(backend, source):
    generator = seeded_generator("adam into adamw", backend, source.__name__)
    params = [random_tensor(generator, 5)]
    saved = _trained(source, [p.clone() for p in params], generator, weight_decay=0.1).state_dict()
    ours = FusedAdamW([p.clone() for p in params], lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW([p.clone() for p in params], lr=1e-2)
    ours.load_state_dict(copy.deepcopy(saved))
    theirs.load_state_dict(copy.deepcopy(saved))
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    ours_params, their_params = ours.param_groups[0]["params"], theirs.param_groups[0]["params"]
    new_grads(generator, ours_params, their_params)
    ours.step()
    theirs.step()
    assert_optimizers_match(ours, theirs, ours_params, their_params)


def _model(generator: torch.Generator) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(DEVICE)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(random_tensor(generator, *param.shape))
    return model


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        optimizer.zero_grad()
        model(batch).square().sum().backward()
        optimizer.step()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("route", ["state_dict", "get_optimizer_state_dict"])
@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
def test_distributed_checkpoints_move_between_torch_and_ours(backend, route, direction, tmp_path):
    """``dcp.save`` by one, ``dcp.load`` (default planner) into the other, in one process, continuing exactly as
    an uninterrupted torch.optim.AdamW run would."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    generator = seeded_generator("dcp", backend, route, direction)
    batches = [random_tensor(generator, 6, 4) for _ in range(5)]
    reference = _model(generator)
    writer_model, reader_model = copy.deepcopy(reference), copy.deepcopy(reference)
    uninterrupted = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    _train(reference, uninterrupted, batches)

    def make(model: torch.nn.Module, ours: bool) -> torch.optim.Optimizer:
        params = model.parameters()
        return FusedAdamW(params, lr=1e-2, backend=backend) if ours else torch.optim.AdamW(params, lr=1e-2)

    writer = make(writer_model, direction == "ours-to-torch")
    reader = make(reader_model, direction == "torch-to-ours")
    _train(writer_model, writer, batches[:3])
    if route == "state_dict":
        dcp.save({"optim": writer.state_dict()}, checkpoint_id=tmp_path)
        _train(reader_model, reader, batches[:1])  # (a reader's state_dict lists state only once it has some)
        target = {"optim": reader.state_dict()}
        dcp.load(target, checkpoint_id=tmp_path)
        reader.load_state_dict(target["optim"])
    else:
        dcp.save({"optim": get_optimizer_state_dict(writer_model, writer)}, checkpoint_id=tmp_path)
        target = {"optim": get_optimizer_state_dict(reader_model, reader)}
        dcp.load(target, checkpoint_id=tmp_path)
        set_optimizer_state_dict(reader_model, reader, target["optim"])
    reader_model.load_state_dict(writer_model.state_dict())
    _train(reader_model, reader, batches[3:])
    for (name, ours), expected in zip(reader_model.named_parameters(), reference.parameters(), strict=True):
        assert_close_relative(ours.detach(), expected.detach(), name)
    assert [float(s["step"]) for s in reader.state.values()] == [5.0] * 4


# ---- master weights keep the user's writes ----


def _edits():
    def copy_in(param: torch.Tensor, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)

    def fill(param: torch.Tensor, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.fill_(float(value.flatten()[0]))

    def replace(param: torch.Tensor, value: torch.Tensor) -> None:
        param.data = value.clone()

    def module_load(param: torch.Tensor, value: torch.Tensor) -> None:
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(param, requires_grad=param.requires_grad)
        holder.load_state_dict({"weight": value})

    return {"copy_": copy_in, "fill_": fill, ".data =": replace, "load_state_dict": module_load}


EDITS = _edits()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("master_weights", [True, "lean"], ids=["fp32-master", "lean"])
@pytest.mark.parametrize("edit", EDITS)
def test_a_param_the_user_writes_is_kept_by_master_weights(backend, master_weights, edit):
    """After the edit a step with lr=0 and no weight decay leaves the param as written; later steps start from it,
    as torch.optim.AdamW on fp32 params given the same edit does (within bf16 rounding)."""
    generator = seeded_generator("master edit", backend, master_weights, edit)
    params = [random_tensor(generator, 300, dtype=torch.bfloat16)]
    # (fp32 moments, as the fp32 twin's: the params then differ by their rounding to bf16 only)
    options = dict(weight_decay=0.0, backend=backend, master_weights=master_weights, state_dtype=torch.float32)
    ours = FusedAdamW(params, lr=1e-2, **options)
    twins = [p.float() for p in params]
    theirs = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        new_grads(generator, params, twins)
        ours.step()
        theirs.step()
    value = random_tensor(generator, 300, dtype=torch.bfloat16)
    EDITS[edit](params[0], value)
    EDITS[edit](twins[0], value.float())
    for group in (*ours.param_groups, *theirs.param_groups):
        group["lr"] = 0.0
    new_grads(generator, params, twins)
    ours.step()
    theirs.step()
    assert torch.equal(params[0].detach(), value if edit != "fill_" else torch.full_like(value, float(value[0])))
    for group in (*ours.param_groups, *theirs.param_groups):
        group["lr"] = 1e-2
    for _ in range(2):
        new_grads(generator, params, twins)
        ours.step()
        theirs.step()
    # The param is the master's rounding: within half a bf16 ulp of the fp32 twin (one ulp: its rounding rule).
    ulp = torch.finfo(torch.bfloat16).eps * twins[0].detach().abs()
    assert bool(((params[0].float() - twins[0].detach()).abs() <= ulp).all()), "the edit was not kept"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("master_weights", [True, "lean"], ids=["fp32-master", "lean"])
def test_a_master_state_dict_through_torch_optim_and_back_keeps_torchs_steps(backend, master_weights):
    """torch.optim.AdamW casts a master (or a lean remainder) to the param's dtype when it loads it: coming back,
    that master is dropped and the param, with every step torch took, is the truth."""
    generator = seeded_generator("master detour", backend, master_weights)
    params = [random_tensor(generator, 64, dtype=torch.bfloat16)]
    ours = FusedAdamW(params, lr=1e-2, backend=backend, master_weights=master_weights)
    for _ in range(2):
        new_grads(generator, params)
        ours.step()
    detour = [p.detach().clone() for p in params]
    torch_optimizer = torch.optim.AdamW(detour, lr=1e-2)
    torch_optimizer.load_state_dict(copy.deepcopy(ours.state_dict()))
    for _ in range(2):
        new_grads(generator, detour)
        torch_optimizer.step()
    back = [p.detach().clone() for p in detour]
    loaded = FusedAdamW(back, lr=1e-2, backend=backend, master_weights=master_weights)
    loaded.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))
    for group in loaded.param_groups:
        group["lr"] = 0.0
    new_grads(generator, back)
    loaded.step()
    assert torch.equal(back[0].detach(), detour[0].detach()), "torch's steps were thrown away"


# ---- differentiable, duplicates ----


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_a_gradient_through_differentiable_steps_equals_torchs(kind):
    generator = seeded_generator("differentiable", kind)
    start = random_tensor(generator, 6)
    grads = [random_tensor(generator, 6) for _ in range(3)]

    def through(cls) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.ones(6, dtype=torch.float32, requires_grad=True)
        param = (start * scale).clone()  # (a non-leaf param: its update stays in the graph)
        optimizer = cls([param], lr=0.1, weight_decay=0.1, differentiable=True)
        for grad in grads:
            param.grad = grad * scale
            optimizer.step()
        (gradient,) = torch.autograd.grad(param.square().sum(), scale)
        return param.detach(), gradient

    ours, theirs = through(OURS[kind]), through(getattr(torch.optim, kind))
    assert_close_relative(ours[0], theirs[0], "param")
    assert_close_relative(ours[1], theirs[1], "gradient through the steps")
    assert ours[1].abs().sum() > 0


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_a_param_listed_twice_in_a_group_is_refused_at_construction(kind):
    param = torch.randn(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own warning comes first)
        with pytest.raises(ValueError, match="param 1 of the param group is param 0 again"):
            OURS[kind]([param, param])
