"""Encoder + projection head (brainage.models): shapes, size, checkpoint loading."""

from __future__ import annotations

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
