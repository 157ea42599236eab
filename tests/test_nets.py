"""nets: every net gives (N, classes) logits at several resolutions; strides/kernels change the conv stack;
the ResNet-18 transfer path loads a local state dict, replaces the head and freezes what it should."""
import pytest
import torch

import nets
from cli import UsageError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,resolutions", [pytest.param("alexnet", (64, 100), marks=pytest.mark.slow),
                                              pytest.param("flat", (64, 160), marks=pytest.mark.slow),
                                              ("narrow", (64, 96)), ("resnet18", (32, 64))])
def test_every_net_gives_class_logits_at_several_resolutions(name, resolutions):
    model = nets.build(name, 7).eval()
    with torch.no_grad():
        for res in resolutions:
            assert model(torch.zeros(2, 3, res, res)).shape == (2, 7)


@pytest.mark.slow
def test_alexnet_keeps_the_study_geometry_at_224():
    # 224 -> 55 after the 11/4 conv and 6x6 before the classifier, as in AlexNet, with or without batch norm.
    model = nets.build("alexnet", 5, batchnorm=True, dropout=0.5)
    conv1 = model.features[0]
    assert (conv1.out_channels, conv1.kernel_size, conv1.stride) == (96, (11, 11), (4, 4))
    assert conv1(torch.zeros(1, 3, 224, 224)).shape[-1] == 55
    assert model.features(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 6, 6)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.features)
    assert [m.p for m in model.classifier if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


@pytest.mark.slow
def test_flat_is_shallower_and_narrow_is_narrower():
    def convs(model):
        return [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    alex, flat, narrow = (convs(nets.build(n, 5)) for n in ("alexnet", "flat", "narrow"))
    assert len(flat) == len(alex) - 2
    assert len(narrow) == len(alex)
    assert all(n.out_channels < a.out_channels for n, a in zip(narrow, alex))


@pytest.mark.slow
def test_strides_and_kernels_are_per_layer_parameters():
    model = nets.build("flat", 5, strides=(2, 1, 1), kernels=(7, 3, 3))
    conv = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in conv] == [2, 1, 1] and [c.kernel_size[0] for c in conv] == [7, 3, 3]
    # Stride 2 instead of 4 keeps a 32 px input alive through the three pools.
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(UsageError, match="3 positive integers"):
        nets.build("flat", 5, strides=(4, 1))
    with pytest.raises(UsageError, match="unknown net"):
        nets.build("vgg", 5)


@pytest.mark.slow
def test_transfer_loads_a_local_state_dict_and_replaces_the_head(tmp_path):
    from torchvision.models import resnet18
    torch.manual_seed(1)
    imagenet = resnet18(weights=None)  # stands in for downloaded ImageNet weights: same keys and shapes
    path = tmp_path / "resnet18.pt"
    torch.save(imagenet.state_dict(), path)

    model = nets.build("resnet18", 4, pretrained=path, freeze=True)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_mean, imagenet.layer4[1].bn2.running_mean)
    assert model.fc.out_features == 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    # A frozen backbone keeps the pretrained normalisation even in train mode.
    model.train()(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.layer1[0].bn1.running_var, imagenet.layer1[0].bn1.running_var)
    assert all(p.requires_grad for p in nets.build("resnet18", 4, pretrained=path).parameters())


@pytest.mark.slow
def test_transfer_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        nets.build("resnet18", 4, pretrained=tmp_path / "missing.pt")
    wrong = tmp_path / "narrow.pt"
    torch.save(nets.build("narrow", 4).state_dict(), wrong)
    with pytest.raises(UsageError, match="does not hold torchvision resnet18 weights"):
        nets.build("resnet18", 4, pretrained=wrong)
    from torchvision.models import resnet18
    reshaped = tmp_path / "small_stem.pt"
    state = resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, reshaped)
    with pytest.raises(UsageError, match="conv1.weight has shape"):
        nets.build("resnet18", 4, pretrained=reshaped)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not a readable torch state dict"):
        nets.build("resnet18", 4, pretrained=garbage)
    from training.runfolder import save_checkpoint
    run = tmp_path / "last.pt"  # a fastpix run's checkpoint, one weight changed after it was saved
    save_checkpoint(run, model=resnet18(weights=None).state_dict(), config={"net": "resnet18"})
    saved = torch.load(run, weights_only=True)
    saved["model"]["conv1.weight"][0, 0, 0, 0] += 1
    torch.save(saved, run)
    with pytest.raises(UsageError, match=f"^--pretrained {run} is damaged: its content no longer matches"):
        nets.build("resnet18", 4, pretrained=run)
    with pytest.raises(UsageError, match="needs --pretrained"):
        nets.build("resnet18", 4, freeze=True)
