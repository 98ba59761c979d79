"""Encoder + projection head (brainage.models): shapes, size, checkpoint loading."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

from brainage.config import ConfigError, resolve_cell
from brainage.models import (
    BrainAgeNet,
    build_model,
    count_parameters,
    embed_all,
    load_encoder,
    load_init_checkpoint,
    map_state_dict,
    max_pool3d_in_2d_passes,
)
from conftest import modules_after

#: MONAI ResNet-18 (3D, 1 channel, no fc, shortcuts without bias) + head 512-512-128.
EXPECTED_PARAMETERS = 33_160_000 + (512 * 512 + 512) + (512 * 128 + 128)


@pytest.fixture(scope="module")
def model() -> BrainAgeNet:
    torch.manual_seed(0)
    return build_model(model_section({})).eval()


def model_section(values: dict) -> dict:
    """A resolved model section: the schema's defaults with ``values`` over them."""
    return resolve_cell({"model": values})["model"]


def test_parameter_count_matches_the_paper(model):
    assert count_parameters(model) == EXPECTED_PARAMETERS
    assert abs(count_parameters(model) / 1e6 - 33.5) < 0.05  # "33.5M parameters"
    assert count_parameters(model.encoder) == 33_160_000


def test_shapes_and_unit_norm(model):
    volumes = torch.randn(3, 1, 16, 20, 16)
    projected = model(volumes)
    assert projected.shape == (3, 128)
    assert torch.allclose(projected.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.features(volumes, "encoder").shape == (3, 512)
    assert torch.allclose(model.features(volumes, "projection"), projected, atol=1e-6)


def test_architecture_is_the_reference_resnet18(model):
    stem = model.encoder.conv1
    assert stem.kernel_size == (7, 7, 7) and stem.stride == (2, 2, 2) and stem.in_channels == 1
    assert not model.encoder.no_max_pool
    assert model.encoder.fc is None
    assert [len(getattr(model.encoder, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert model.encoder.layer2[0].downsample[0].bias is None  # as the reference code


def test_without_projection_head():
    network = build_model(model_section({"projection_head": False, "features": "encoder"}))
    assert network.head is None
    output = network(torch.randn(2, 1, 12, 12, 12))
    assert output.shape == (2, 512)
    # training builds the model without the read-out's features (the default,
    # "projection"): that must work; config validation refuses the pair (test_config)
    assert build_model(model_section({"projection_head": False})).head is None
    with pytest.raises(ConfigError, match="model.features"):
        build_model(model_section({"features": "logits"}))


def _renamed_openbhb_state(model: BrainAgeNet) -> dict:
    """The model's weights as the reference code saves them under DataParallel, plus an fc
    layer and one tensor of a foreign shape."""
    state = {f"module.{key}": value.clone() + 0.5 for key, value in model.state_dict().items()
             if not key.endswith("num_batches_tracked")}
    state["module.encoder.fc.weight"] = torch.zeros(1, 512)
    state["module.head.2.weight"] = torch.zeros(64, 512)  # another projection width
    return state


def test_checkpoint_with_renamed_keys_loads_and_reports(model, tmp_path, caplog):
    path = tmp_path / "openbhb.pth"
    torch.save({"model": _renamed_openbhb_state(model), "epoch": 300}, path)
    target = build_model(model_section({}))
    with caplog.at_level("INFO", logger="brainage.models"):
        report = load_init_checkpoint(target, path)
    assert torch.equal(target.encoder.conv1.weight, model.encoder.conv1.weight + 0.5)
    assert torch.equal(target.encoder.layer4[1].bn2.running_var,
                       model.encoder.layer4[1].bn2.running_var + 0.5)
    assert report.unexpected == ["module.encoder.fc.weight"]
    assert len(report.mismatched) == 1 and "head.2.weight" in report.mismatched[0]
    assert report.missing == ["head.2.weight"]
    assert "1 missing, 1 unexpected, 1 with another shape" in caplog.text
    assert "WARNING" not in {record.levelname for record in caplog.records}  # the head only


def test_an_encoder_of_several_maps_loads_its_kernels_onto_the_same_maps(tmp_path, caplog):
    """Our encoder.pt records its channels; its first convolution loaded by position, so a
    cell listing the same maps in another order read each map with another's kernel."""
    three = BrainAgeNet(width=8, in_channels=3)
    recorded = ["stiffness", "damping_ratio", "T1w"]
    torch.save({"model": three.state_dict(), "settings": {"model": {"modalities": recorded}}},
               tmp_path / "three.pt")
    wanted = ["damping_ratio", "T1w", "stiffness"]  # a rotation: each direction differs
    rotated = BrainAgeNet(width=8, in_channels=3)
    with caplog.at_level("INFO", logger="brainage.models"):
        load_init_checkpoint(rotated, tmp_path / "three.pt", modalities=wanted)
    for channel, name in enumerate(wanted):  # each map keeps the kernel trained on it
        assert torch.equal(rotated.encoder.conv1.weight[:, channel],
                           three.encoder.conv1.weight[:, recorded.index(name)])
    assert torch.equal(rotated.encoder.layer1[0].conv1.weight,
                       three.encoder.layer1[0].conv1.weight)
    assert "reordered to this cell's damping_ratio, T1w, stiffness" in caplog.text
    source = BrainAgeNet(width=8, in_channels=2)
    path = tmp_path / "encoder.pt"
    torch.save({"format": 1, "model": source.state_dict(),
                "settings": {"model": {"modalities": ["stiffness", "damping_ratio"]}}}, path)
    kernels = source.encoder.conv1.weight
    swapped = BrainAgeNet(width=8, in_channels=2)
    load_init_checkpoint(swapped, path, modalities=["damping_ratio", "stiffness"])
    assert torch.equal(swapped.encoder.conv1.weight, kernels[:, [1, 0]])
    same = BrainAgeNet(width=8, in_channels=2)
    load_init_checkpoint(same, path, modalities=["stiffness", "damping_ratio"])
    assert torch.equal(same.encoder.conv1.weight, kernels)
    caplog.clear()
    other = BrainAgeNet(width=8, in_channels=2)
    with caplog.at_level("WARNING", logger="brainage.models"):
        load_init_checkpoint(other, path, modalities=["stiffness", "T1w"])
    assert torch.equal(other.encoder.conv1.weight, kernels)  # by position, and said
    assert [record.getMessage() for record in caplog.records] == [
        f"config key model.init_checkpoint: {path} was trained on the channels stiffness, "
        f"damping_ratio, this cell reads stiffness, T1w: its first convolution's kernels are "
        f"loaded by position, each on another map than it was trained on. Choose an encoder "
        f"of these maps, or set model.modalities to its channels."]
    # a one-channel encoder (T1w pretraining) initialises every channel, as documented
    t1w = tmp_path / "t1w.pt"
    torch.save({"model": BrainAgeNet(width=8).state_dict(),
                "settings": {"model": {"modalities": ["T1w"]}}}, t1w)
    caplog.clear()
    with caplog.at_level("WARNING", logger="brainage.models"):
        load_init_checkpoint(BrainAgeNet(width=8, in_channels=2), t1w,
                             modalities=["stiffness", "damping_ratio"])
    assert not caplog.records


def test_a_checkpoint_that_leaves_encoder_tensors_random_is_warned_about(model, tmp_path,
                                                                        caplog):
    """A checkpoint with another stem and no downsample convolutions loaded in part with
    only an INFO line: the cell fine-tuned an encoder whose first convolution and
    shortcuts were random (found by a review). A head of another width stays INFO."""
    state = _renamed_openbhb_state(model)
    state["module.encoder.conv1.weight"] = torch.zeros(64, 1, 3, 3, 3)  # a 3x3x3 stem
    state = {key: value for key, value in state.items() if "downsample" not in key}
    path = tmp_path / "other_stem.pth"
    torch.save(state, path)
    with caplog.at_level("INFO", logger="brainage.models"):
        report = load_init_checkpoint(build_model(model_section({})), path)
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    shortcuts = [key for key in report.missing if "downsample" in key]
    assert len(warnings) == 1 and shortcuts
    assert (f"{len(shortcuts) + 1} encoder tensor(s) keep their random initialisation"
            in warnings[0].getMessage())
    assert "encoder.conv1.weight" in warnings[0].getMessage()


def test_a_resnet_of_other_blocks_is_refused_not_loaded_in_part(model, tmp_path):
    """A MedicalNet-style Bottleneck ResNet (1x1x1, 3x3x3, 1x1x1 convolutions per block)
    loaded its 3x3x3 kernels into the ResNet-18's block convolutions of the same shape,
    with a warning only, and the cell was reported as fine-tuned from it; a ResNet-34 loaded
    its first two blocks per stage and ignored the others with an INFO line."""
    state = _renamed_openbhb_state(model)
    for name in [name for name in state if re.search(r"layer\d\.\d\.conv1\.weight$", name)]:
        width = state[name].shape[0]
        state[name] = torch.zeros(width, state[name].shape[1], 1, 1, 1)
        state[name.replace("conv1", "conv3")] = torch.zeros(4 * width, width, 1, 1, 1)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"resnet50\.pth is not a 3D ResNet-18 checkpoint: its "
                                         r"blocks have a third convolution \(layer1\.0, "
                                         r"layer1\.1, .*a Bottleneck ResNet"):
        load_init_checkpoint(build_model(model_section({})), path)
    state = _renamed_openbhb_state(model)
    for name in [name for name in state if ".layer2.1." in name]:  # a ResNet-34's 3rd block
        state[name.replace(".layer2.1.", ".layer2.2.")] = state[name]
    for wrapped in (state, {f"encoder.{name[len('module.'):]}": value  # encoder.encoder.*
                            for name, value in state.items()}):
        torch.save(wrapped, path)
        with pytest.raises(ValueError, match=r"it has blocks this ResNet-18 lacks \(layer2\.2\)"
                                             r": a deeper ResNet"):
            load_init_checkpoint(build_model(model_section({})), path)
    state = _renamed_openbhb_state(model)
    del state["module.encoder.layer4.1.conv2.weight"]  # a block short: another depth
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 block convolution\(s\) of this network find no "
                                         r"kernel of their shape in it \(encoder\.layer4\.1"
                                         r"\.conv2\.weight\)"):
        load_init_checkpoint(build_model(model_section({})), path)


def test_bare_resnet_state_dict_maps_under_encoder(model):
    bare = {key[len("encoder."):]: value for key, value in model.state_dict().items()
            if key.startswith("encoder.")}
    mapped, report = map_state_dict(bare, model.state_dict())
    assert set(mapped) == {key for key in model.state_dict() if key.startswith("encoder.")}
    assert not report.unexpected and not report.mismatched
    assert all(key.startswith("head.") for key in report.missing)


def test_checkpoint_errors(tmp_path):
    target = build_model(model_section({}))
    with pytest.raises(FileNotFoundError, match="model.init_checkpoint"):
        load_init_checkpoint(target, tmp_path / "missing.pt")
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, unrelated)
    with pytest.raises(ValueError, match="no encoder convolution"):
        load_init_checkpoint(target, unrelated)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {"encoder.conv1.weight": torch.zeros(1)}, "opts": object()}, pickled)
    with pytest.raises(ValueError, match="cannot be read") as error:  # weights_only refuses
        load_init_checkpoint(target, pickled)
    # the message says what to do instead of torch's advice to load with weights_only=False
    assert "If you trust the file" in str(error.value) and str(pickled) in str(error.value)
    assert "two options" not in str(error.value)


def test_an_unreadable_init_checkpoint_is_named_with_what_to_do(tmp_path):
    """A missing file said only that it did not exist, and a damaged one gave the unpickler's
    error: neither said what to do about config key model.init_checkpoint."""
    target = build_model(model_section({}))
    with pytest.raises(FileNotFoundError, match=r"model\.init_checkpoint: .*missing\.pt does "
                                                r"not exist\. Correct the path or unset"):
        load_init_checkpoint(target, tmp_path / "missing.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    no_weights = tmp_path / "no_weights.pt"
    torch.save({"epoch": 3}, no_weights)
    for path in (damaged, no_weights):
        with pytest.raises(ValueError, match=rf"model\.init_checkpoint: {path} cannot be read "
                                             rf"as a PyTorch state dict .*Replace it with a "
                                             rf"file torch\.save wrote .*or unset the key"):
            load_init_checkpoint(target, path)


def test_a_reference_code_checkpoint_with_its_argparse_options_loads(model, tmp_path):
    """The reference code's save_model writes {'opts': argparse.Namespace, 'model',
    'optimizer', 'epoch', 'run_id'}; weights_only=True refused the Namespace, so the
    checkpoints the docs say load without renaming did not load at all."""
    import argparse

    path = tmp_path / "ckpt_epoch_300.pth"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.save({"opts": argparse.Namespace(lr=1e-4, tf="noise", lr_decay_epochs=[700, 800]),
                "model": _renamed_openbhb_state(model), "optimizer": optimizer.state_dict(),
                "epoch": 300, "run_id": "abc123"}, path)
    target = build_model(model_section({}))
    report = load_init_checkpoint(target, path)
    assert torch.equal(target.encoder.conv1.weight, model.encoder.conv1.weight + 0.5)
    assert report.unexpected == ["module.encoder.fc.weight"]


def test_checkpoint_of_another_width_is_refused_naming_the_width(tmp_path):
    """Every batch norm's num_batches_tracked is a scalar, so it fits a ResNet of any width:
    a checkpoint of width 16 "loaded" those 23 counters into a width-8 network, passed the
    check for a fitting encoder tensor, and training started from random weights with only
    a log line saying that 101 tensors had another shape."""
    path = tmp_path / "width16.pt"
    torch.save({"model": BrainAgeNet(width=16).state_dict()}, path)
    target = BrainAgeNet(width=8)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError, match="no encoder convolution") as error:
        load_init_checkpoint(target, path)
    message = str(error.value)
    assert str(path) in message and "model.init_checkpoint" in message
    assert "model.width 16" in message and "Set model.width: 16" in message
    assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())
    # the same width loads; a one-channel checkpoint still initialises two channels
    report = load_init_checkpoint(BrainAgeNet(width=16, in_channels=2), path)
    assert "encoder.conv1.weight" in report.loaded and not report.mismatched


def test_a_2d_resnet18_checkpoint_is_refused(tmp_path):
    """An ImageNet-style 2D ResNet-18 has every batch-norm shape of ours but not one 3D
    kernel: 100 batch-norm tensors 'loaded', the check for a fitting encoder tensor passed,
    and training fine-tuned random convolutions under foreign batch-norm statistics."""
    from monai.networks.nets import resnet18

    path = tmp_path / "imagenet.pth"
    torch.save(resnet18(spatial_dims=2, n_input_channels=3, feed_forward=True,
                        shortcut_type="B").state_dict(), path)
    target = BrainAgeNet(width=64)
    before = target.encoder.bn1.running_var.clone()
    with pytest.raises(ValueError, match="no encoder convolution") as error:
        load_init_checkpoint(target, path)
    assert str(path) in str(error.value)
    assert "(64, 3, 7, 7): a 2D network, not a 3D ResNet-18" in str(error.value)
    assert torch.equal(target.encoder.bn1.running_var, before)


def test_load_encoder_errors_name_the_file_and_the_mismatch(tmp_path):
    """An encoder.pt of another width or channel count gave load_state_dict's list of 101
    size mismatches and 'Was it trained with other model settings?'; a damaged file or one
    holding objects gave torch's error without the file's name (for the latter advising
    weights_only=False); a bare state dict was reported as a model mismatch ('model')."""
    settings = model_section({"width": 8})
    cases = {
        "width16.pt": ({"model": BrainAgeNet(width=16).state_dict()},
                       "model.width 16 and 1 input channel.*configured one model.width 8 and 1"),
        "two_maps.pt": ({"model": BrainAgeNet(width=8, in_channels=2).state_dict()},
                        "model.width 8 and 2 input channel.*configured one model.width 8 and 1"),
        "bias.pt": ({"model": BrainAgeNet(width=8, bias_downsample=True).state_dict()},
                    "Unexpected key.*downsample.0.bias"),
        "bare.pt": (BrainAgeNet(width=8).state_dict(), "holds no 'model' state dict"),
        "objects.pt": ({"model": BrainAgeNet(width=8).state_dict(), "opts": object()},
                       "objects that weights_only=True refuses"),
    }
    for name, (payload, _) in cases.items():
        torch.save(payload, tmp_path / name)
    (tmp_path / "damaged.pt").write_bytes(b"PK\x03\x04 cut short")
    cases["damaged.pt"] = (None, "cannot be read as an encoder.pt")
    for name, (_, expected) in cases.items():
        with pytest.raises(ValueError, match=expected) as error:
            load_encoder(tmp_path / name, settings)
        message = str(error.value)
        assert str(tmp_path / name) in message, message
        assert "train_encoder" in message or "model.init_checkpoint" in message, message
        assert "size mismatch" not in message and len(message) < 400, message
    assert load_encoder(tmp_path / "width16.pt", model_section({"width": 16})).encoder_dim == 128


def test_read_out_features_use_running_statistics_and_full_float32():
    """BrainAgeNet.features of a network in training mode normalised with the batch's own
    statistics and overwrote the running ones (under no_grad, unnoticed); embed_all under
    a caller's bf16 autocast computed bf16 features although it promises full float32."""
    import numpy as np

    from brainage.data import VolumeStore

    torch.manual_seed(0)
    network = BrainAgeNet(width=8)
    with torch.no_grad():  # running statistics unlike a batch's own
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    volumes = torch.randn(4, 1, 16, 20, 16)
    statistics = {key: value.clone() for key, value in network.state_dict().items()}
    expected = network.eval().features(volumes, "encoder")
    network.train()
    for which in ("encoder", "projection"):
        network.features(volumes, which)
    assert network.training
    assert all(torch.equal(value, statistics[key])
               for key, value in network.state_dict().items())
    assert torch.equal(network.features(volumes, "encoder"), expected)

    store = VolumeStore(volumes.numpy(), torch.device("cpu"))
    rows = np.arange(len(volumes))
    reference = embed_all(network, store, rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = embed_all(network, store, rows)
    for which in ("encoder", "projection"):
        assert np.array_equal(under_autocast[which], reference[which]), which
    assert np.allclose(reference["encoder"], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_bf16_encoder_agrees_with_float32(model, channels_last):
    """A 16x20x16 volume drives layer3 and layer4 to an innermost output size of 1 with
    stride 2, the shape class where oneDNN 3.12's bf16 convolution returns wrong values on
    AVX512/AMX CPUs (pytorch/pytorch#169688): with oneDNN the encoder's output was off by
    about its own magnitude here. runtime_setup keeps CPU bf16 off oneDNN."""
    from brainage.runtime import runtime_setup

    torch.manual_seed(1)
    volumes = torch.randn(4, 1, 16, 20, 16)
    float32 = {"threads": 1, "device": "cpu", "precision": "float32", "deterministic": False}
    runtime_setup(float32)
    assert torch.backends.mkldnn.enabled
    reference = model.features(volumes, "encoder")
    device, dtype = runtime_setup({**float32, "precision": "bf16"})
    assert dtype == torch.bfloat16 and not torch.backends.mkldnn.enabled
    if channels_last:
        volumes = volumes.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = model.features(volumes, "encoder")
    runtime_setup(float32)
    relative_error = (encoded - reference).abs().max() / reference.abs().max()
    assert relative_error < 0.05, float(relative_error)


def test_cuda_determinism_is_switched_both_ways(monkeypatch):
    """A process that runs a deterministic job and then a fast one (the tests, the random
    search in one process) must leave deterministic algorithms on for the first only: it
    once set them on and never off again. The CUDA branch runs on a CPU machine with
    select_device answering cuda (it only sets backend flags)."""
    from brainage import runtime

    monkeypatch.setattr(runtime, "select_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    settings = {"threads": 1, "device": "cuda", "precision": "float32"}
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32)
    try:
        runtime.runtime_setup({**settings, "deterministic": True})
        assert torch.are_deterministic_algorithms_enabled()
        # float32 (the paper config) keeps matrix products in float32: no TF32
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        runtime.runtime_setup({**settings, "precision": "auto", "deterministic": True})
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        runtime.runtime_setup({**settings, "deterministic": False})
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        # a CPU job after a deterministic CUDA one kept deterministic algorithms on (the
        # CPU branch never switched them off): slower kernels, NaN-filled torch.empty
        runtime.runtime_setup({**settings, "deterministic": True})
        monkeypatch.setattr(runtime, "select_device", lambda name: torch.device("cpu"))
        runtime.runtime_setup({**settings, "device": "cpu", "deterministic": True})
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=True)
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cuda.matmul.allow_tf32) = saved[1:]


def test_a_cpu_job_does_not_import_torchinductor_to_switch_determinism_off():
    # PyTorch 2.13's use_deterministic_algorithms imports TorchInductor (1-1.5 s of a
    # prediction, an export, an untrained cell); a CPU job, where it stays off, skips it
    modules = modules_after(
        "from brainage.runtime import runtime_setup; runtime_setup({'threads': 1, "
        "'device': 'cpu', 'precision': 'float32', 'deterministic': True})")
    assert "torch" in modules and "torch._inductor" not in modules


@pytest.mark.parametrize("shape", [(2, 3, 17, 20, 15), (1, 4, 8, 9, 10), (1, 1, 3, 2, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_max_pool_in_2d_passes_is_the_3d_max_pool(shape, channels_last):
    """The form deterministic CUDA training uses for the stem pool (kernel 3, stride 2,
    padding 1; models.DeterministicMaxPool3d): the same maxima bit for bit, and gradients
    reaching the same voxels (equal to float rounding: overlapping windows add in another
    order; exactly equal for integer gradients)."""
    generator = torch.Generator().manual_seed(0)
    volumes = torch.randn(shape, generator=generator, dtype=torch.float64)
    if channels_last:
        volumes = volumes.to(memory_format=torch.channels_last_3d)
    volumes.requires_grad_()
    expected = F.max_pool3d(volumes, 3, 2, 1)
    pooled = max_pool3d_in_2d_passes(volumes, 3, 2, 1)
    assert pooled.shape == expected.shape and torch.equal(pooled, expected)
    for gradient in (torch.randn(expected.shape, generator=generator, dtype=torch.float64),
                     torch.ones_like(expected)):
        reference, = torch.autograd.grad(expected, volumes, gradient, retain_graph=True)
        routed, = torch.autograd.grad(pooled, volumes, gradient, retain_graph=True)
        assert torch.equal(routed != 0, reference != 0)
        torch.testing.assert_close(routed, reference, rtol=0, atol=1e-12)


def test_the_deterministic_pools_leave_the_network_and_its_checkpoints_as_they_were(model):
    """Outside deterministic CUDA training the pools are MONAI's own: the same output
    on the CPU, and no new state-dict keys (checkpoints written before load as before)."""
    from monai.networks.nets import resnet18

    reference = resnet18(spatial_dims=3, n_input_channels=1, feed_forward=False,
                         conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
                         bias_downsample=False)
    assert model.encoder.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(model.encoder.state_dict())
    volumes = torch.randn(2, 1, 20, 24, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.encode(volumes), reference.eval()(volumes))


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), None), ((8, 0), torch.bfloat16),
                                                      ((9, 0), torch.bfloat16)])
def test_auto_precision_trains_in_bf16_only_on_cards_with_bf16_arithmetic(
        monkeypatch, caplog, capability, expected):
    """A V100 (7.0) emulates bf16, slower than float32: ``precision: auto`` gave it bf16
    autocast. The CUDA branch runs on a CPU machine with select_device answering cuda."""
    from brainage import runtime

    monkeypatch.setattr(runtime, "select_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    settings = {"threads": 1, "device": "cuda", "deterministic": False}
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32)
    try:
        with caplog.at_level("INFO", logger="brainage.runtime"):
            assert runtime.runtime_setup({**settings, "precision": "auto"})[1] == expected
            # asked for by name, bf16 it is
            assert runtime.runtime_setup({**settings, "precision": "bf16"})[1] == torch.bfloat16
        assert ("Tesla V100-SXM2-32GB (compute capability 7.0) has no bf16 arithmetic"
                in caplog.text) == (expected is None)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=True)
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cuda.matmul.allow_tf32) = saved[1:]


# -- behaviour pinned by hand-made mutants (brainage.models, brainage.runtime) ---------------

def test_a_regression_head_outputs_raw_values_and_a_projection_head_unit_vectors():
    """head: regression is the supervised baseline's one standardised age: L2-normalising
    a one-dimensional output would make every prediction +1 or -1."""
    torch.manual_seed(0)
    volumes = torch.randn(5, 1, 12, 12, 12)
    regression = BrainAgeNet(width=8, head="regression", projection_dim=1).eval()
    with torch.no_grad():
        ages = regression(volumes)
        assert ages.shape == (5, 1)
        assert torch.equal(ages, regression.head(regression.encode(volumes)).float())
    assert not torch.allclose(ages.abs(), torch.ones_like(ages))


def test_build_model_passes_the_stem_and_shortcut_options():
    """conv1_stride, max_pool and bias_downsample of the model section reach the network
    (bias_downsample decides whether an OpenBHB checkpoint loads completely)."""
    default = build_model(model_section({"width": 8}))
    options = build_model(model_section({"width": 8, "conv1_stride": 1, "max_pool": False,
                                         "bias_downsample": True}))
    assert default.encoder.conv1.stride == (2, 2, 2) and options.encoder.conv1.stride == (1, 1, 1)
    assert not default.encoder.no_max_pool and options.encoder.no_max_pool
    assert default.encoder.layer2[0].downsample[0].bias is None
    assert options.encoder.layer2[0].downsample[0].bias is not None
    # the stem decides the size of the last stage: 16 -> 8 -> 4 -> 4, 2, 1, 1 by default,
    # 16 -> 16 -> 16 -> 16, 8, 4, 2 with stride 1 and no max-pool
    sizes = {}
    for name, network in (("default", default.eval()), ("options", options.eval())):
        network.encoder.layer4.register_forward_hook(
            lambda module, inputs, output, name=name: sizes.update({name: output.shape[2:]}))
        with torch.no_grad():
            network(torch.randn(1, 1, 16, 16, 16))
    assert sizes == {"default": (1, 1, 1), "options": (2, 2, 2)}


def test_a_backbone_without_its_branch_is_refused_not_built_as_a_resnet():
    """build_model never read model.encoder: a backbone added to the schema without a
    branch here trained and reported a ResNet-18 under its name (found by a review)."""
    section = model_section({"width": 8})
    assert isinstance(build_model(section), BrainAgeNet)
    with pytest.raises(ConfigError, match=r"config key model\.encoder is 'small3d': "
                                          r"brainage\.models\.build_model builds resnet18 "
                                          r"only"):
        build_model({**section, "encoder": "small3d"})


def test_read_out_features_restore_eval_mode_and_refuse_unknown_features():
    """features() and embed_all() put the module back in the mode it was in, eval included;
    an unknown read-out is a ConfigError naming model.features."""
    import numpy as np

    from brainage.data import VolumeStore
    from brainage.models import embed

    network = BrainAgeNet(width=8).eval()
    volumes = torch.randn(2, 1, 12, 12, 12)
    network.features(volumes, "encoder")
    assert not network.training
    store = VolumeStore(volumes.numpy(), torch.device("cpu"))
    embed_all(network, store, np.arange(2))
    assert not network.training
    network.train()
    embed_all(network, store, np.arange(2))
    assert network.training
    with pytest.raises(ConfigError, match="model.features"):
        network.features(volumes, "logits")
    with pytest.raises(ConfigError, match="model.features"):
        embed(network, store, np.arange(2), which="logits")


def test_embed_all_in_batches_gives_the_features_of_one_pass_in_the_rows_order():
    """Volumes are embedded EMBED_BATCH at a time: batches of 3 over 7 rows in a shuffled
    order give the same rows, in the same order, as one batch (eval mode: running batch-norm
    statistics, so a volume's features do not depend on its batch)."""
    import numpy as np

    from brainage.data import VolumeStore

    torch.manual_seed(0)
    network = BrainAgeNet(width=8)
    volumes = torch.randn(8, 1, 12, 12, 12)
    store = VolumeStore(volumes.numpy(), torch.device("cpu"))
    rows = np.array([5, 0, 7, 3, 1, 6, 2])
    whole = embed_all(network, store, rows)
    batched = embed_all(network, store, rows, batch_size=3)
    for which, width in (("encoder", 64), ("projection", 128)):
        assert whole[which].shape == batched[which].shape == (7, width)
        np.testing.assert_allclose(batched[which], whole[which], rtol=0, atol=1e-5)
    single = embed_all(network, store, rows[2:3])
    np.testing.assert_allclose(whole["encoder"][2:3], single["encoder"], rtol=0, atol=1e-5)


def test_embed_all_of_no_rows_gives_empty_arrays_of_each_features_width():
    import numpy as np

    from brainage.data import VolumeStore

    store = VolumeStore(np.zeros((2, 1, 12, 12, 12), dtype=np.float32), torch.device("cpu"))
    for network, widths in ((BrainAgeNet(width=8), (64, 128)),
                            (BrainAgeNet(width=8, projection_head=False), (64, 64)),
                            (BrainAgeNet(width=8, projection_dim=16), (64, 16))):
        features = embed_all(network, store, np.arange(0))
        assert features["encoder"].shape == (0, widths[0])
        assert features["projection"].shape == (0, widths[1])
        assert features["encoder"].dtype == features["projection"].dtype == np.float32


def test_wrapper_prefixes_are_stripped_repeatedly_and_an_encoder_wrapper_unwrapped(model):
    """DataParallel around a compiled model writes module._orig_mod.*; a wrapper holding the
    network as .encoder writes encoder.encoder.*; both load onto the same names."""
    target = model.state_dict()
    kernel = target["encoder.conv1.weight"]
    for raw_key in ("module._orig_mod.encoder.conv1.weight", "model.module.conv1.weight",
                    "encoder.encoder.conv1.weight", "module.encoder.encoder.conv1.weight"):
        mapped, report = map_state_dict({raw_key: kernel}, target)
        assert list(mapped) == ["encoder.conv1.weight"], raw_key
        assert report.loaded == ["encoder.conv1.weight"] and not report.unexpected, raw_key


def test_extract_state_dict_skips_an_empty_model_entry():
    from brainage.models import extract_state_dict

    weights = {"encoder.conv1.weight": torch.zeros(2, 1, 7, 7, 7)}
    assert extract_state_dict({"model": {}, "state_dict": weights}) == weights
    assert extract_state_dict({"net": weights, "epoch": 3}) == weights
    with pytest.raises(ValueError, match="no state dict"):
        extract_state_dict({"model": {}})


def test_a_one_channel_kernel_of_another_width_or_size_is_not_replicated(tmp_path):
    """Only a first convolution of this network's width and kernel size initialises a
    C-channel one: another width or kernel is a shape mismatch, not a crash in
    load_state_dict, and a whole checkpoint of another width is refused naming it."""
    target = BrainAgeNet(width=8, in_channels=2)
    for shape in ((16, 1, 7, 7, 7), (8, 1, 3, 3, 3)):
        mapped, report = map_state_dict({"encoder.conv1.weight": torch.ones(shape)},
                                        target.state_dict())
        assert not mapped and not report.adapted and len(report.mismatched) == 1, shape
    path = tmp_path / "width16.pt"
    torch.save({"model": BrainAgeNet(width=16).state_dict()}, path)
    with pytest.raises(ValueError, match="Set model.width: 16"):
        load_init_checkpoint(target, path)


def test_a_refused_checkpoint_under_a_wrapper_prefix_still_names_its_width(tmp_path):
    path = tmp_path / "dataparallel16.pt"
    state = {f"module.{key}": value for key, value in BrainAgeNet(width=16).state_dict().items()}
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="Set model.width: 16"):
        load_init_checkpoint(BrainAgeNet(width=8), path)


def test_select_device(monkeypatch):
    from brainage.runtime import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    assert select_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device is 'cuda'"):
        select_device("cuda")
    with pytest.raises(ConfigError, match="train.device is 'gpu'"):
        select_device("gpu")


@pytest.mark.parametrize("cuda_build, blamed", [
    (None, "is a CPU-only build"),  # the usual case: the CPU wheel on a GPU node
    ("13.0", "the NVIDIA driver may be older"),
])
def test_gpus_pytorch_cannot_use_are_blamed_on_the_right_cause(monkeypatch, caplog,
                                                               cuda_build, blamed):
    """A job given GPUs that computes on the CPU: with a CPU-only torch the warning blamed
    the NVIDIA driver or the card, where the build is the cause."""
    from brainage.runtime import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with caplog.at_level("WARNING", logger="brainage.runtime"):
        assert select_device("auto") == torch.device("cpu")
    assert blamed in caplog.text
    assert ("driver" in caplog.text) == (cuda_build is not None)


def test_runtime_setup_threads_precision_and_refusals(monkeypatch):
    """P processes on a node share its train.threads (at least one each); CPU auto is
    float32; an unknown precision and a local rank without its GPU are ConfigErrors."""
    from brainage import runtime

    settings = {"threads": 4, "device": "cpu", "precision": "auto", "deterministic": False}
    assert runtime.runtime_setup(settings) == (torch.device("cpu"), None)
    assert torch.get_num_threads() == 4
    runtime.runtime_setup(settings, processes_on_node=2)
    assert torch.get_num_threads() == 2
    runtime.runtime_setup(settings, processes_on_node=8)
    assert torch.get_num_threads() == 1
    with pytest.raises(ConfigError, match="train.precision is 'fp16'"):
        runtime.runtime_setup({**settings, "precision": "fp16"})
    monkeypatch.setattr(runtime, "select_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for local_rank in (2, 3):
        with pytest.raises(ConfigError, match=f"needs GPU {local_rank}, but PyTorch sees 2"):
            runtime.runtime_setup({**settings, "device": "cuda", "precision": "float32"},
                                  local_rank=local_rank)


def test_deterministic_cuda_sets_the_cublas_workspace_unless_set(monkeypatch):
    """cuBLAS is deterministic only with CUBLAS_WORKSPACE_CONFIG; a user's value stays."""
    from brainage import runtime

    monkeypatch.setattr(runtime, "select_device", lambda name: torch.device("cuda"))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    settings = {"threads": 1, "device": "cuda", "precision": "float32"}
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32)
    try:
        runtime.runtime_setup({**settings, "deterministic": False})
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        runtime.runtime_setup({**settings, "deterministic": True})
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        runtime.runtime_setup({**settings, "deterministic": True})
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=True)
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cuda.matmul.allow_tf32) = saved[1:]


def _draws() -> tuple:
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_seeds_python_numpy_and_torch():
    from brainage.runtime import seed_everything

    seed_everything(3)
    first = _draws()
    _draws()
    seed_everything(3)
    assert _draws() == first
    seed_everything(4)
    assert all(a != b for a, b in zip(_draws(), first))


def test_rng_state_round_trips_every_generator_through_a_weights_only_checkpoint(tmp_path):
    import io

    from brainage.runtime import restore_rng_state, rng_state, seed_everything

    seed_everything(5)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = _draws()
    _draws()
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    assert _draws() == expected


def test_epoch_seeds_differ_per_seed_epoch_and_stream_and_fit_63_bits():
    from brainage.runtime import epoch_seed

    seeds = {(seed, epoch, stream): epoch_seed(seed, epoch, stream)
             for seed in range(3) for epoch in range(1, 6) for stream in range(2)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= value < 2**63 for value in seeds.values())
    assert epoch_seed(1, 2, 0) == epoch_seed(1, 2, 0)


def test_full_float32_restores_the_tf32_flags():
    from brainage.runtime import full_float32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for flags in ((True, True), (False, True)):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
            with full_float32():
                assert not torch.backends.cuda.matmul.allow_tf32
                assert not torch.backends.cudnn.allow_tf32
                assert not torch.is_autocast_enabled("cpu")
            assert (torch.backends.cuda.matmul.allow_tf32,
                    torch.backends.cudnn.allow_tf32) == flags
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_a_job_given_gpus_that_pytorch_cannot_use_says_so_and_computes_on_the_cpu(
        monkeypatch, caplog):
    """PyPI's torch wheel is built for CUDA 13: on a node with an older driver, or a V100,
    a training job given a GPU trained on the CPU without a word (found by a review), until
    its time ran out. train.device auto says so; cuda stops."""
    import logging

    from brainage import runtime
    from brainage.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with caplog.at_level(logging.WARNING, logger="brainage.runtime"):
        assert runtime.select_device("auto") == torch.device("cpu")
    assert "given GPU(s) 0,1 (CUDA_VISIBLE_DEVICES), but PyTorch" in caplog.text
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        runtime.select_device("cuda")
    caplog.clear()
    for unset in ("", "-1"):  # no GPU given: the CPU is what the job asked for
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", unset)
        assert runtime.select_device("auto") == torch.device("cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runtime.select_device("auto") == torch.device("cpu")
    assert caplog.text == ""
