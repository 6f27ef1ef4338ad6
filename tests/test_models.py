"""The CIFAR-100 zoo: layouts equal the community checkpoints', forward semantics checked by hand.

The layout reference is ``shared/reference/teacher_state_dict_keys.json`` (keys, order and shapes of the
released checkpoints). Its digest per architecture is pinned below so the test runs without the file; when
the file is found it is also compared key by key (and the pinned digests against it).
The numerical checks recompute whole networks with ``torch.nn.functional`` calls straight from the state
dict, written independently of the modules, so a wrong ReLU, shortcut, pool or shuffle order fails.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlib import models
from kdlib.errors import KDLibError

# name -> (num_params, number of state-dict entries, sha256[:16] of the JSON list [[key, shape], ...])
REFERENCE = {
    "resnet8": (83892, 56, "8454cf760e88e282"),
    "resnet14": (181108, 92, "9fe2d47f83b316b5"),
    "resnet20": (278324, 128, "f9dffb5cd056d222"),
    "resnet32": (472756, 200, "b8c084b09c3e7845"),
    "resnet44": (667188, 272, "8f2eb9ffdc5da52f"),
    "resnet56": (861620, 344, "a0b7f7cd4900c329"),
    "resnet110": (1736564, 668, "9d552da9247104fa"),
    "resnet8x4": (1233540, 62, "0b8003cb891e2402"),
    "resnet32x4": (7433860, 206, "aecfcad6824123a5"),
    "wrn_16_1": (180916, 82, "a7ef59715312da46"),
    "wrn_16_2": (703284, 83, "ed178d5242382ddb"),
    "wrn_40_1": (569780, 226, "1e65af2e365ab351"),
    "wrn_40_2": (2255156, 227, "f50f409af9f63048"),
    "vgg8": (3965028, 37, "ce35fd5c12ab155f"),
    "vgg11": (9277284, 58, "b3ec7411fc36322e"),
    "vgg13": (9462180, 72, "20ef2419bbf1b10a"),
    "vgg16": (14774436, 93, "a4f169502f98906b"),
    "vgg19": (20086692, 114, "3ff64c602411bb17"),
    "MobileNetV2": (812836, 320, "cccb917695b99fd6"),
    "ShuffleV1": (949258, 296, "71109132f0772d4e"),
    "ShuffleV2": (1355528, 338, "47ee01a49bb03be4"),
    "ResNet50": (23705252, 320, "54d081fac0265c06"),
    "ResNet18": (11220132, 122, "f7566e411bc6cfca"),
}
NAMES = list(REFERENCE)
_REPO = Path(__file__).resolve().parents[1]
_JSON_CANDIDATES = [
    os.environ.get("KDLIB_REFERENCE_KEYS", ""),
    _REPO / "tests/data/teacher_state_dict_keys.json",  # a copy of the shared reference, kept with the tests
    _REPO / "shared/reference/teacher_state_dict_keys.json",
    _REPO.parent / "shared/reference/teacher_state_dict_keys.json",
]


def _layout(model):
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def _digest(layout):
    return hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()[:16]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny batches: one thread is as fast, and immune to other processes holding the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo():
    """Each network built once (seeded) for the read-only tests."""
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            built[name] = models.create(name).eval()
        return built[name]

    return get


def _randomize(model, seed=0):
    """Non-trivial BN statistics and affine terms (and conv biases), so eval-mode BN is no identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.2)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    return model.eval()


def _input(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- names and layouts


def test_names_are_the_community_names_in_order():
    assert models.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_and_parameter_count(zoo, name):
    model = zoo(name)
    layout = _layout(model)
    num_params, entries, digest = REFERENCE[name]
    assert len(layout) == entries
    assert _digest(layout) == digest, f"{name}: keys, order or shapes differ from the reference"
    assert sum(p.numel() for p in model.parameters()) == num_params


def test_layouts_equal_the_reference_json(zoo):
    path = next((Path(p) for p in _JSON_CANDIDATES if p and Path(p).is_file()), None)
    if path is None:
        pytest.skip("teacher_state_dict_keys.json not found; the pinned digests still check the layouts")
    archs = json.loads(path.read_text())["archs"]
    assert list(archs) == NAMES
    for name, ref in archs.items():
        assert (ref["num_params"], len(ref["state_dict"]), _digest(ref["state_dict"])) == REFERENCE[name]
        assert _layout(zoo(name)) == ref["state_dict"], name


# ----------------------------------------------------------------------------- forward contract


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_forward_features_agree(zoo, name):
    model = zoo(name)
    x = _input()
    with torch.no_grad():
        logits = model(x)
        feat_logits, feats = model.forward_features(x)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, feat_logits)
    assert set(feats) == {"stages", "pooled"}
    assert feats["pooled"].shape == (2, model.head.in_features)
    assert torch.equal(model.head(feats["pooled"]), logits)
    assert len(feats["stages"]) >= 4
    assert all(s.dim() == 4 and s.shape[0] == 2 for s in feats["stages"])


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                                  "ResNet18"])
def test_ten_classes(name):
    model = models.create(name, num_classes=10).eval()
    with torch.no_grad():
        assert model(_input(1)).shape == (1, 10)
    assert model.head.out_features == 10


def test_create_rejects_bad_arguments():
    with pytest.raises(KDLibError, match="unknown model 'resnet9'.*resnet8"):
        models.create("resnet9")
    for bad in (0, -3, 2.5, "10", True):
        with pytest.raises(KDLibError, match="num_classes"):
            models.create("resnet8", num_classes=bad)
    assert models.create("resnet8", num_classes=np.int64(7)).fc.out_features == 7


def test_community_initialisation():
    torch.manual_seed(0)
    resnet = models.create("resnet32x4")
    conv = resnet.layer3[0].conv2  # 256 x 256 x 3 x 3: He normal with fan-out = 9 * 256
    assert conv.weight.std().item() == pytest.approx((2.0 / (9 * 256)) ** 0.5, rel=0.02)
    assert torch.equal(resnet.bn1.weight, torch.ones(32)) and torch.equal(resnet.bn1.bias, torch.zeros(32))
    vgg = models.create("vgg13")
    assert vgg.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert not vgg.classifier.bias.any() and not vgg.block2[0].bias.any()
    assert not models.create("wrn_16_2").fc.bias.any()


# ----------------------------------------------------------------------------- load_pretrained


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "ShuffleV2", "MobileNetV2"])
def test_load_pretrained_round_trip(tmp_path, name):
    source = _randomize(models.create(name), seed=3)
    x = _input()
    with torch.no_grad():
        expected = source(x)
    sd = source.state_dict()
    files = {
        # the released teachers' layout, with python numbers and a numpy scalar beside the weights
        "community.pth": {"epoch": 240, "model": sd, "accuracy": np.float64(73.4),
                          "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5}]}},
        "bare.pth": sd,
        "dataparallel.pth": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "distiller.pth": {"model": {**{f"module.student.{k}": v for k, v in sd.items()},
                                    "module.teacher.fc.weight": torch.zeros(3, 3)}},
    }
    for filename, obj in files.items():
        torch.save(obj, tmp_path / filename)
    # checkpoints written by PyTorch < 1.6 use the legacy (non-zip) serialization
    torch.save({"model": sd}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for filename in [*files, "legacy.pth"]:
        model = models.load_pretrained(name, tmp_path / filename)
        assert not model.training, filename
        with torch.no_grad():
            assert torch.equal(model(x), expected), filename


def test_load_pretrained_wrong_architecture(tmp_path):
    path = tmp_path / "resnet8.pth"
    torch.save({"model": models.create("resnet8").state_dict()}, path)
    with pytest.raises(KDLibError) as err:
        models.load_pretrained("resnet14", path)
    message = str(err.value)
    assert "does not fit 'resnet14'" in message
    assert "30 missing keys" in message and "layer1.1.conv1.weight" in message
    assert "fits 'resnet8' with num_classes=100" in message
    shape_message = r"shape mismatches \(fc.weight: file \[100, 64\] vs model \[10, 64\]"
    with pytest.raises(KDLibError, match=shape_message):
        models.load_pretrained("resnet8", path, num_classes=10)
    with pytest.raises(KDLibError, match="unexpected keys"):
        models.load_pretrained("wrn_16_1", path)


def test_load_pretrained_not_a_checkpoint(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(KDLibError, match="not a PyTorch checkpoint"):
        models.load_pretrained("resnet8", noise)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(KDLibError, match="empty"):
        models.load_pretrained("resnet8", tmp_path / "empty.pth")
    with pytest.raises(KDLibError, match="does not exist"):
        models.load_pretrained("resnet8", tmp_path / "missing.pth")
    for obj in ([1, 2, 3], {"epoch": 3}, {"model": {"conv1.weight": 1.0}}):
        torch.save(obj, tmp_path / "other.pth")
        with pytest.raises(KDLibError, match="not a model checkpoint"):
            models.load_pretrained("resnet8", tmp_path / "other.pth")
    with pytest.raises(KDLibError, match="unknown model"):
        models.load_pretrained("resnet9", noise)


class _Opaque:
    """A python object that only full unpickling can rebuild."""


def test_load_pretrained_refuses_arbitrary_objects_unless_allowed(tmp_path):
    sd = models.create("resnet8").state_dict()
    path = tmp_path / "opaque.pth"
    torch.save({"model": sd, "extra": _Opaque()}, path)
    with pytest.raises(KDLibError, match="allow_pickle=True"):
        models.load_pretrained("resnet8", path)
    model = models.load_pretrained("resnet8", path, allow_pickle=True)
    assert torch.equal(model.fc.weight, sd["fc.weight"])


# ----------------------------------------------------------------------------- independent forward checks
# Whole networks recomputed with functional calls from the state dict, in eval mode.


def _bn(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], training=False, eps=1e-5)


def _conv(sd, p, x, stride=1, groups=1):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd.get(f"{p}.bias"), stride=stride, padding=w.shape[-1] // 2, groups=groups)


def _shuffle(x, groups):
    # by explicit index: output channel j*groups + i is input channel i*(C/groups) + j
    c = x.shape[1]
    order = [i * (c // groups) + j for j in range(c // groups) for i in range(groups)]
    return x[:, order]


def _check(name, reference, rtol=1e-4, atol=1e-4):
    model = _randomize(models.create(name), seed=5)
    sd = model.state_dict()
    x = _input(2, seed=7)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
        ref_logits, ref_stages, ref_pooled = reference(sd, x)
    torch.testing.assert_close(logits, ref_logits, rtol=rtol, atol=atol)
    torch.testing.assert_close(feats["pooled"], ref_pooled, rtol=rtol, atol=atol)
    assert len(feats["stages"]) == len(ref_stages)
    for got, want in zip(feats["stages"], ref_stages):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_resnet8_by_hand():
    def reference(sd, x):
        x = F.relu(_bn(sd, "bn1", _conv(sd, "conv1", x)))
        stages = [x]
        for layer, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2)):
            p = f"{layer}.0"
            out = F.relu(_bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", x, stride)))
            out = _bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", out))
            short = x
            if f"{p}.downsample.0.weight" in sd:
                projected = F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride)
                short = _bn(sd, f"{p}.downsample.1", projected)
            x = F.relu(out + short)
            stages.append(x)
        pooled = x.mean(dim=(2, 3))
        return F.linear(pooled, sd["fc.weight"], sd["fc.bias"]), stages, pooled

    _check("resnet8", reference)


def test_wrn_16_2_by_hand():
    def block(sd, p, x, stride):
        act = F.relu(_bn(sd, f"{p}.bn1", x))
        out = F.relu(_bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv1", act, stride)))
        out = _conv(sd, f"{p}.conv2", out)
        # a width-changing block projects the activated input; otherwise the raw input is added
        if f"{p}.convShortcut.weight" in sd:
            return F.conv2d(act, sd[f"{p}.convShortcut.weight"], stride=stride) + out
        return x + out

    def reference(sd, x):
        x = _conv(sd, "conv1", x)
        stages = [x]
        for stage, stride in (("block1", 1), ("block2", 2), ("block3", 2)):
            x = block(sd, f"{stage}.layer.0", x, stride)
            x = block(sd, f"{stage}.layer.1", x, 1)
            stages.append(x)
        pooled = F.relu(_bn(sd, "bn1", x)).mean(dim=(2, 3))
        return F.linear(pooled, sd["fc.weight"], sd["fc.bias"]), stages, pooled

    _check("wrn_16_2", reference)


def test_vgg8_by_hand():
    def reference(sd, x):
        stages = []
        for k in range(5):
            if k in (1, 2, 3):  # no pool before block 4 on 32-pixel inputs
                x = F.max_pool2d(x, 2)
            x = F.relu(_bn(sd, f"block{k}.1", _conv(sd, f"block{k}.0", x)))
            stages.append(x)
        pooled = x.mean(dim=(2, 3))
        return F.linear(pooled, sd["classifier.weight"], sd["classifier.bias"]), stages, pooled

    _check("vgg8", reference)


def test_mobilenetv2_by_hand():
    def inverted(sd, p, x, stride):
        hidden = sd[f"{p}.conv.0.weight"].shape[0]
        out = F.relu(_bn(sd, f"{p}.conv.1", _conv(sd, f"{p}.conv.0", x)))
        out = F.relu(_bn(sd, f"{p}.conv.4", _conv(sd, f"{p}.conv.3", out, stride, groups=hidden)))
        out = _bn(sd, f"{p}.conv.7", _conv(sd, f"{p}.conv.6", out))
        return x + out if stride == 1 and out.shape == x.shape else out

    def reference(sd, x):
        x = F.relu(_bn(sd, "conv1.1", _conv(sd, "conv1.0", x, stride=2)))
        stages = [x]
        blocks_per_stage = (1, 2, 3, 4, 3, 3, 1)
        first_strides = (1, 1, 2, 2, 1, 2, 1)
        for s, (n, stride) in enumerate(zip(blocks_per_stage, first_strides)):
            for b in range(n):
                x = inverted(sd, f"blocks.{s}.{b}", x, stride if b == 0 else 1)
            if s in (1, 2, 4, 6):
                stages.append(x)
        x = F.relu(_bn(sd, "conv2.1", _conv(sd, "conv2.0", x)))
        assert x.shape[-1] == 2  # 32 -> 16 (stem) -> 8 -> 4 -> 2
        pooled = x.mean(dim=(2, 3))
        return F.linear(pooled, sd["classifier.0.weight"], sd["classifier.0.bias"]), stages, pooled

    _check("MobileNetV2", reference)


def test_shufflenetv1_by_hand():
    def unit(sd, p, x, stride):
        w1 = sd[f"{p}.conv1.weight"]
        g1 = x.shape[1] // w1.shape[1]  # 1 for the unit reading the 24 stem channels, else 3
        assert g1 == (1 if x.shape[1] == 24 else 3)
        out = F.relu(_bn(sd, f"{p}.bn1", F.conv2d(x, w1, groups=g1)))
        out = _shuffle(out, g1)
        mid = out.shape[1]
        out = F.relu(_bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", out, stride, groups=mid)))
        out = _bn(sd, f"{p}.bn3", F.conv2d(out, sd[f"{p}.conv3.weight"], groups=3))
        if stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)

    def reference(sd, x):
        x = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"])))
        stages = [x]
        for layer, n in (("layer1", 4), ("layer2", 8), ("layer3", 4)):
            for b in range(n):
                x = unit(sd, f"{layer}.{b}", x, 2 if b == 0 else 1)
            stages.append(x)
        pooled = x.mean(dim=(2, 3))
        return F.linear(pooled, sd["linear.weight"], sd["linear.bias"]), stages, pooled

    _check("ShuffleV1", reference)


def test_shufflenetv2_by_hand():
    def basic(sd, p, x):
        half = x.shape[1] // 2
        out = F.relu(_bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", x[:, half:])))
        out = _bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", out, groups=half))
        out = F.relu(_bn(sd, f"{p}.bn3", _conv(sd, f"{p}.conv3", out)))
        return _shuffle(torch.cat([x[:, :half], out], 1), 2)

    def down(sd, p, x):
        left = _bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", x, 2, groups=x.shape[1]))
        left = F.relu(_bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", left)))
        right = F.relu(_bn(sd, f"{p}.bn3", _conv(sd, f"{p}.conv3", x)))
        right = _bn(sd, f"{p}.bn4", _conv(sd, f"{p}.conv4", right, 2, groups=right.shape[1]))
        right = F.relu(_bn(sd, f"{p}.bn5", _conv(sd, f"{p}.conv5", right)))
        return _shuffle(torch.cat([left, right], 1), 2)

    def reference(sd, x):
        x = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"])))
        stages = [x]
        for layer, n in (("layer1", 3), ("layer2", 7), ("layer3", 3)):
            x = down(sd, f"{layer}.0", x)
            for b in range(1, n + 1):
                x = basic(sd, f"{layer}.{b}", x)
            stages.append(x)
        pooled = F.relu(_bn(sd, "bn2", F.conv2d(x, sd["conv2.weight"]))).mean(dim=(2, 3))
        return F.linear(pooled, sd["linear.weight"], sd["linear.bias"]), stages, pooled

    _check("ShuffleV2", reference)


def test_resnet50_bottleneck_by_hand():
    """ResNet50's first stage by hand (stride on the 3x3 conv, 4x expansion, ReLU after the sum)."""
    model = _randomize(models.create("ResNet50"), seed=9)
    sd = model.state_dict()
    x = _input(1, seed=11)

    def bottleneck(p, x, stride):
        out = F.relu(_bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", x)))
        out = F.relu(_bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", out, stride)))
        out = _bn(sd, f"{p}.bn3", _conv(sd, f"{p}.conv3", out))
        short = x
        if f"{p}.shortcut.0.weight" in sd:
            short = _bn(sd, f"{p}.shortcut.1", F.conv2d(x, sd[f"{p}.shortcut.0.weight"], stride=stride))
        return F.relu(out + short)

    with torch.no_grad():
        _, feats = model.forward_features(x)
        f0 = F.relu(_bn(sd, "bn1", _conv(sd, "conv1", x)))
        f1 = f0
        for b in range(3):
            f1 = bottleneck(f"layer1.{b}", f1, 1)
        f2 = bottleneck("layer2.0", f1, 2)
    torch.testing.assert_close(feats["stages"][0], f0)
    torch.testing.assert_close(feats["stages"][1], f1, rtol=1e-4, atol=1e-4)
    # the stride-2 block on the model's own stage-1 output: 32x32 -> 16x16
    with torch.no_grad():
        torch.testing.assert_close(model.layer2[0](feats["stages"][1]), f2, rtol=1e-4, atol=1e-4)
    assert f2.shape == (1, 512, 16, 16)
