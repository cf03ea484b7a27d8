"""Export: segments cut where a schedule says, ONNX graphs that match torch, files that are never half-used."""

import importlib.util

import pytest
import torch

from rtdiff.export.check import check_export, check_model
from rtdiff.export.exported import ExportError
from rtdiff.export.onnx_export import export_onnx, sha256
from rtdiff.export.onnxruntime_backend import OrtDenoiser
from rtdiff.policies.backend import use_onnxruntime
from rtdiff.export.segments import run_pieces, segments_from_schedule, split
from rtdiff.policies.checkpoint import load_policy, save_policy
from rtdiff.runtime.checkpoints import checkpoint_hash
from rtdiff.runtime.accel.bac import FORMAT, BACache, save_schedule
from rtdiff.runtime.accel.hooks import CacheHooks
from tests.conftest import make_tiny_policy

STEPS = 10
PATTERNS = ([0, 3, 6, 9], [0, 5], [0, 2, 4, 6, 8])  # update steps; pairs of neighbouring blocks share one


def tiny_schedule(block_names: list[str], weights: str) -> dict:
    blocks = {name: PATTERNS[(k // 2) % len(PATTERNS)] for k, name in enumerate(block_names)}
    return {"format": FORMAT, "steps": STEPS, "solver": "ddim", "budget": 2, "checkpoint_sha256": weights,
            "blocks": blocks}


def inputs(policy, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    config = policy.config
    x = torch.randn(batch, config.horizon, config.action_dim, generator=generator)
    t = torch.randint(0, 100, (batch,), generator=generator)
    cond = torch.rand(batch, config.n_obs_steps, config.obs_dim, generator=generator) * 2 - 1
    return x, t, cond


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module", params=["unet", "transformer"])
def exported(request, tmp_path_factory):
    """A tiny checkpoint, a schedule with several segments, and its export at batch sizes 1 and 3."""
    folder = tmp_path_factory.mktemp(f"export-{request.param}")
    checkpoint = save_policy(make_tiny_policy(request.param), folder / "policy")
    policy = load_policy(checkpoint)
    schedule = tiny_schedule([name for name, _, _ in policy.denoiser.cache_blocks()], checkpoint_hash(checkpoint))
    save_schedule(schedule, folder / "schedule.json")
    export_onnx(str(checkpoint), folder / "onnx", folder / "schedule.json", batch_sizes=(1, 3))
    return checkpoint, schedule, folder / "onnx"


def test_segments_are_runs_of_blocks_with_the_same_updates():
    names = [f"b{k}" for k in range(7)]
    schedule = tiny_schedule(names, "")
    assert segments_from_schedule(names, schedule) == [["b0", "b1"], ["b2", "b3"], ["b4", "b5"], ["b6"]]
    assert segments_from_schedule(names, None) == [names]
    with pytest.raises(ValueError, match="does not have"):
        segments_from_schedule(names[:-1], schedule)


@torch.no_grad()
def test_pieces_reproduce_the_model_exactly(policy):
    names = [name for name, _, _ in policy.denoiser.cache_blocks()]
    x, t, cond = inputs(policy, 2)
    reference = policy.denoiser(x, t, cond)
    for segments in ([names], [[name] for name in names]):
        torch.testing.assert_close(run_pieces(split(policy.denoiser, segments), x, t, obs=cond), reference, rtol=0, atol=0)


@torch.no_grad()
def test_cached_piece_does_what_the_hooks_do_when_a_segment_is_served(policy):
    names = [name for name, _, _ in policy.denoiser.cache_blocks()]
    segments = [names[:2], names[2:5], names[5:]]
    pieces = split(policy.denoiser, segments)
    x, t, cond = inputs(policy, 2)
    x_next, t_next, _ = inputs(policy, 2, seed=1)
    hooks = CacheHooks(policy.denoiser).attach()
    try:
        hooks.cache.set_step(set(names))
        policy.denoiser(x, t, cond)
        cached = dict(hooks.cache.outputs)
        hooks.cache.set_step(set(names) - set(segments[1]))
        reference = policy.denoiser(x_next, t_next, cond)
    finally:
        hooks.detach()
    values = {"x": x_next, "t": t_next, "obs": cond}
    for k, piece in enumerate(pieces):
        part = piece.cached if k == 1 else piece.full
        if k == 1:
            values.update({value: cached[name] for name, value in zip(piece.blocks, piece.block_values)})
        values.update(zip(part.outputs, part.module(*(values[name] for name in part.inputs))))
    torch.testing.assert_close(values["out"], reference, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 3, 2])  # 2 was not exported: it runs padded to 3
def test_onnxruntime_denoiser_matches_torch(exported, batch):
    checkpoint, _, folder = exported
    policy = load_policy(checkpoint)
    denoiser = OrtDenoiser(folder, checkpoint_hash(checkpoint))
    x, t, cond = inputs(policy, batch)
    with torch.no_grad():
        reference = policy.denoiser(x, t, cond)
    got = denoiser(x, t, cond)
    assert got.shape == reference.shape
    assert relative_error(got, reference) <= 1e-4


def test_onnxruntime_chunk_with_the_schedule_matches_torch(exported):
    checkpoint, schedule, folder = exported
    reference_policy = load_policy(checkpoint)
    policy = use_onnxruntime(load_policy(checkpoint), folder, checkpoint_hash(checkpoint))
    solver = policy.make_solver("ddim", STEPS)
    obs = torch.rand(3, policy.config.n_obs_steps, policy.config.obs_dim, generator=torch.Generator().manual_seed(2))
    for make in (lambda: None, lambda: BACache(schedule, "ddim", STEPS)):
        torch_accel, ort_accel = make(), make()
        reference = reference_policy.predict_chunk(obs, solver, torch.Generator().manual_seed(3), torch_accel)
        got = policy.predict_chunk(obs, solver, torch.Generator().manual_seed(3), ort_accel)
        assert relative_error(got, reference) <= 1e-4
        if torch_accel is not None:  # the same blocks ran: the backend's cache counts as the hooks do
            assert ort_accel.stats() == torch_accel.stats()
            assert ort_accel.stats()["block_evals_fraction"] < 1


def test_a_schedule_that_splits_an_exported_segment_is_refused(exported, tmp_path):
    checkpoint, schedule, _ = exported
    export_onnx(str(checkpoint), tmp_path / "whole", batch_sizes=(1,))  # no schedule: one segment
    policy = use_onnxruntime(load_policy(checkpoint), tmp_path / "whole")
    obs = torch.zeros(1, policy.config.n_obs_steps, policy.config.obs_dim)
    with pytest.raises(ValueError, match="export with the schedule"):
        policy.predict_chunk(obs, policy.make_solver("ddim", STEPS), None, BACache(schedule, "ddim", STEPS))


def test_a_corrupted_graph_is_refused_before_any_session(exported, tmp_path):
    folder = exported[2]
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    graph = sorted(copy.rglob("*.onnx"))[-1]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=graph.name):
        OrtDenoiser(copy)
    graph.unlink()
    with pytest.raises(ExportError, match="missing"):
        OrtDenoiser(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ExportError, match="no manifest.json"):
        OrtDenoiser(copy)


def test_an_export_of_other_weights_is_refused(exported):
    _, _, folder = exported
    with pytest.raises(ExportError, match="other weights"):
        OrtDenoiser(folder, checkpoint_sha256="0" * 64)


def planted_graph(op: str, **attributes):
    """x -> Cast(float64) -> Cast(float32) -> `op` -> y: a float64 value and, unless op is Identity, an odd op."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["x"], ["x64"], name="planted_cast", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["x64"], ["x32"], name="cast_back", to=TensorProto.FLOAT),
             helper.make_node(op, ["x32"], ["y"], name="planted_op", **attributes)]
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_check_passes_the_exports_graphs(exported):
    assert check_export(exported[2]) == []


def test_check_names_a_planted_float64_and_an_unsupported_op():
    problems = check_model(planted_graph("Identity"), "g.onnx")
    assert any("planted_cast" in p and "float64" in p for p in problems)
    assert not any("planted_op" in p for p in problems)
    problems = check_model(planted_graph("Hardmax"), "g.onnx")  # supported: control for the next line
    assert not any("planted_op" in p for p in problems)
    from onnx import helper

    model = planted_graph("Identity")
    model.graph.node[2].CopyFrom(helper.make_node("STFT", ["x32"], ["y"], name="planted_op"))
    problems = check_model(model, "g.onnx")
    assert any("planted_op (STFT)" in p and "not supported" in p for p in problems)


def test_export_check_command_fails_naming_a_planted_node(exported, tmp_path, capsys):
    import json
    import shutil

    from rtdiff.runtime.cli import main

    folder = tmp_path / "planted"
    shutil.copytree(exported[2], folder)
    main(["export", "--check", str(folder)])
    assert "every graph passes" in capsys.readouterr().out
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["pieces"][0]["full"]["files"]["1"]
    (folder / entry["file"]).write_bytes(planted_graph("Identity").SerializeToString())
    entry["sha256"] = sha256((folder / entry["file"]).read_bytes())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--check", str(folder)])
    assert exit_info.value.code == 1
    assert "planted_cast" in capsys.readouterr().out

@pytest.fixture(scope="module")
def exported_fp16(exported, tmp_path_factory):
    checkpoint, schedule, _ = exported
    folder = tmp_path_factory.mktemp("fp16")
    save_schedule(schedule, folder / "schedule.json")
    export_onnx(str(checkpoint), folder / "onnx", folder / "schedule.json", batch_sizes=(1, 3), precision="fp16")
    return checkpoint, schedule, folder / "onnx"


def test_fp16_export_stays_within_1e_2_of_torch_and_passes_the_check(exported_fp16):
    checkpoint, schedule, folder = exported_fp16
    reference_policy = load_policy(checkpoint)
    policy = use_onnxruntime(load_policy(checkpoint), folder)
    x, t, cond = inputs(reference_policy, 3)
    with torch.no_grad():
        assert relative_error(policy.denoiser(x, t, cond), reference_policy.denoiser(x, t, cond)) <= 1e-2
    solver = policy.make_solver("ddim", STEPS)
    obs = torch.rand(3, policy.config.n_obs_steps, policy.config.obs_dim, generator=torch.Generator().manual_seed(2))
    reference = reference_policy.predict_chunk(obs, solver, torch.Generator().manual_seed(3),
                                               BACache(schedule, "ddim", STEPS))
    got = policy.predict_chunk(obs, solver, torch.Generator().manual_seed(3), BACache(schedule, "ddim", STEPS))
    assert 0 < relative_error(got, reference) <= 1e-2  # not zero: the graphs really compute in fp16
    assert check_export(folder) == []


def test_check_names_the_node_where_fp16_overflows(tmp_path):
    policy = make_tiny_policy("unet")
    with torch.no_grad():  # finite fp16 weights (below 65504) whose product no fp16 value can hold
        for layer in (1, 3):
            weight = policy.denoiser.diffusion_step_encoder[layer].weight
            weight.copy_(weight.sign() * 3000)
    checkpoint = save_policy(policy, tmp_path / "policy")
    export_onnx(str(checkpoint), tmp_path / "onnx", precision="fp16")
    problems = check_export(tmp_path / "onnx")
    assert problems and all("overflows" in p for p in problems)
    assert "diffusion_step_encoder" in problems[0]

# -- GPU backends: these run only where CUDA (and, for TensorRT, the `tensorrt` package) exist ---------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_tensorrt = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None,
                                    reason="needs a CUDA GPU and the tensorrt package")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_backends_refuse_clearly_without_a_gpu(exported):
    from rtdiff.export.cudagraph import use_cudagraph
    from rtdiff.export.tensorrt_backend import TrtDenoiser

    checkpoint, _, folder = exported
    with pytest.raises(ValueError, match="needs CUDA"):
        use_cudagraph(load_policy(checkpoint))
    with pytest.raises(ValueError, match="tensorrt"):
        TrtDenoiser(folder)


@needs_cuda
def test_cudagraph_trajectory_matches_eager_on_the_gpu(exported):
    from rtdiff.export.cudagraph import use_cudagraph

    checkpoint, schedule, _ = exported
    eager = load_policy(checkpoint).to("cuda")
    graphed = use_cudagraph(load_policy(checkpoint))
    solver = eager.make_solver("ddim", STEPS)
    obs = torch.rand(3, eager.config.n_obs_steps, eager.config.obs_dim, generator=torch.Generator().manual_seed(2))
    for make in (lambda: None, lambda: BACache(schedule, "ddim", STEPS)):
        eager_accel, graphed_accel = make(), make()
        reference = eager.predict_chunk(obs, solver, torch.Generator().manual_seed(3), eager_accel)
        for _ in range(2):  # the first call captures, the second replays
            got = graphed.predict_chunk(obs, solver, torch.Generator().manual_seed(3), graphed_accel)
            assert relative_error(got, reference) <= 1e-4
        if eager_accel is not None:
            eager.predict_chunk(obs, solver, torch.Generator().manual_seed(3), eager_accel)
            assert graphed_accel.stats() == eager_accel.stats()


@needs_tensorrt
def test_tensorrt_matches_torch_and_rebuilds_a_corrupted_engine(exported, tmp_path):
    from rtdiff.export.tensorrt_backend import TrtDenoiser

    checkpoint, _, folder = exported
    policy = load_policy(checkpoint)
    x, t, cond = inputs(policy, 3)
    with torch.no_grad():
        reference = policy.denoiser(x, t, cond)
    assert relative_error(TrtDenoiser(folder, cache_dir=tmp_path)(x, t, cond), reference) <= 1e-4
    assert list(tmp_path.glob("*.engine"))
    for engine in tmp_path.glob("*.engine"):
        engine.write_bytes(b"not an engine")
    assert relative_error(TrtDenoiser(folder, cache_dir=tmp_path)(x, t, cond), reference) <= 1e-4


def test_a_cached_export_that_went_bad_is_rebuilt(exported, tmp_path, monkeypatch):
    from rtdiff.export.backends import ensure_onnx_export

    checkpoint, _, _ = exported
    monkeypatch.setenv("RTDIFF_CACHE", str(tmp_path))
    folder = ensure_onnx_export(str(checkpoint), None, (1,))
    graph = next(folder.rglob("*.onnx"))
    good = graph.read_bytes()
    graph.write_bytes(b"garbage")
    assert ensure_onnx_export(str(checkpoint), None, (1,)) == folder
    assert graph.read_bytes() == good  # the export is deterministic: the rebuilt graph is the original
    assert not list(tmp_path.rglob("*.tmp-*"))  # no staging folder left behind
    OrtDenoiser(folder)


@needs_cuda
def test_cudagraph_per_call_graphs_follow_sada_on_the_gpu(tmp_path):
    from rtdiff.export.cudagraph import use_cudagraph
    from rtdiff.runtime.accel import make_accelerator

    checkpoint = save_policy(make_tiny_policy("unet"), tmp_path / "policy")  # no token-wise blocks: SADA skips steps
    eager = load_policy(checkpoint).to("cuda")
    graphed = use_cudagraph(load_policy(checkpoint))
    solver = eager.make_solver("ddim", STEPS)
    obs = torch.rand(2, eager.config.n_obs_steps, eager.config.obs_dim, generator=torch.Generator().manual_seed(2))
    eager_accel, graphed_accel = make_accelerator("sada"), make_accelerator("sada")
    reference = eager.predict_chunk(obs, solver, torch.Generator().manual_seed(3), eager_accel)
    got = graphed.predict_chunk(obs, solver, torch.Generator().manual_seed(3), graphed_accel)
    assert relative_error(got, reference) <= 1e-4
    assert graphed_accel.stats() == eager_accel.stats()
