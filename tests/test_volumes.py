"""Volume towers (rwid_nb.models.volumes): 3D MONAI towers and 2.5D slice towers on real phantom items."""
import json
import pytest
import torch
from torch import nn

from rwid_nb.models.towers import build_tower, IMAGENET_MEAN, IMAGENET_STD

torch.set_num_threads(2)

NETS_3D = {  # small specs: every family, fast on a CPU
    'resnet10': {'type': 'monai_3d', 'net': 'resnet10'},
    'resnet18_group': {'type': 'monai_3d', 'net': 'resnet18', 'norm': 'group'},
    'densenet121': {'type': 'monai_3d', 'net': 'densenet121'},
    'vit': {'type': 'monai_3d', 'net': 'vit', 'img_size': [32, 32, 32], 'patch_size': [16, 16, 16], 'hidden_size': 48,
            'mlp_dim': 96, 'num_layers': 2, 'num_heads': 3},
}
VOL = (2, 1, 32, 32, 32)   # DenseNet-121 needs at least 29 voxels a side


def _tower(name, seed=0):
    torch.manual_seed(seed)
    return build_tower(NETS_3D[name], pretrained=False)


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    "A tiny phantom shards folder with CT and MR volumes (the real dataset path, windowing included)."
    from rwid_nb.data.phantom import generate_cohort
    from rwid_nb.data.dataset import phantom_shards
    from rwid_nb.data.shards import PreprocessSettings
    d = tmp_path_factory.mktemp('volumes')
    generate_cohort(d/'cohort', 6, seed=3, inject_phi=0.0, workers=1, progress=False, modalities=['CT', 'MR'], overwrite=True)
    return phantom_shards(d/'shards', d/'cohort', PreprocessSettings(ct_size=(16, 48, 48), mr_size=(16, 48, 48)), workers=1)


@pytest.mark.parametrize('name', list(NETS_3D))
def test_3d_shape_gradients_and_round_trip(name):
    tw = _tower(name)
    assert tw.kind == '3d' and tw.in_channels == 1
    x = torch.rand(VOL)
    tw.train()
    f = tw(x)
    assert f.shape == (2, tw.out_dim) and torch.isfinite(f).all()
    f.square().mean().backward()
    no_grad = [k for k, p in tw.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"   # no unused parameters (DDP would fail)
    tw.eval(); x = x[:1]
    twin = build_tower(json.loads(json.dumps(tw.spec)), pretrained=False).eval()   # from the JSON spec, another random init
    with torch.no_grad():
        assert not torch.allclose(twin(x), tw(x), atol=1e-4)
        twin.load_state_dict(tw.state_dict())
        assert torch.equal(twin(x), tw(x))


@pytest.mark.parametrize('name', ['resnet10', 'densenet121', 'vit'])
def test_3d_blocks_partition_and_partial_unfreezing(name):
    tw = _tower(name)
    if name == 'densenet121': tw.set_grad_checkpointing(True)      # the dense-block checkpointing path, here at no extra cost
    blocks = tw.blocks()
    ids = [id(p) for b in blocks for p in b.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in tw.parameters()}
    first = next(m for m in blocks[0].modules() if isinstance(m, nn.Conv3d))
    assert first.in_channels == 1                                       # input -> output order
    tw.requires_grad_(False)
    for b in blocks[-2:]: b.requires_grad_(True)
    tw.train()(torch.rand(VOL)).square().mean().backward()
    last = {id(p) for b in blocks[-2:] for p in b.parameters()}
    for p in tw.parameters(): assert (p.grad is not None) == (id(p) in last)


@pytest.mark.parametrize('name', ['resnet10', 'vit'])
def test_3d_grad_checkpointing_changes_nothing_but_memory(name):
    a, b = _tower(name), _tower(name)
    b.set_grad_checkpointing(True)
    x = torch.rand(VOL)
    out = []
    for tw in (a, b):
        tw.train()(x).square().mean().backward()
        out.append(({k: p.grad for k, p in tw.named_parameters()}, dict(tw.named_buffers())))
    for k, g in out[0][0].items(): torch.testing.assert_close(out[1][0][k], g, rtol=1e-4, atol=1e-5)
    for k, v in out[0][1].items(): torch.testing.assert_close(out[1][1][k].float(), v.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', ['resnet10', 'vit'])
def test_3d_lora_with_peft(name):
    "peft wraps every target (Conv3d for the CNNs, Linear for the ViT); only adapters train; merging keeps the function."
    from peft import LoraConfig, get_peft_model
    tw = _tower(name).eval()
    targets = tw.lora_targets()
    x = torch.rand(VOL)
    with torch.no_grad(): before = tw(x)
    pm = get_peft_model(tw, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    wrapped = [k for k, m in pm.named_modules() if hasattr(m, 'lora_A') and k.endswith(tuple(targets))]
    assert len(wrapped) == len(targets)
    trainable = [k for k, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all('lora_' in k for k in trainable)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), before)                       # lora_B starts at zero
        for k, p in pm.named_parameters():
            if 'lora_B' in k: p.normal_(0, 0.02)
        adapted = pm(x)
        assert not torch.allclose(adapted, before, atol=1e-5)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-4)


def test_3d_weights_file_and_errors(tmp_path):
    tw = _tower('resnet10').eval()
    from safetensors.torch import save_file
    save_file(tw.net.state_dict(), tmp_path/'w.safetensors')
    torch.save({'state_dict': {f'module.{k}': v for k, v in tw.net.state_dict().items()}}, tmp_path/'w.pth')
    x = torch.rand(VOL)
    for f in ('w.safetensors', 'w.pth'):
        spec = {**NETS_3D['resnet10'], 'weights': str(tmp_path/f)}
        with torch.no_grad():
            assert torch.equal(build_tower(spec).eval()(x), tw(x))
            assert not torch.allclose(build_tower(spec, pretrained=False).eval()(x), tw(x))   # pretrained=False ignores it
    with pytest.raises(ValueError, match='does not fit the network'):
        build_tower({**NETS_3D['densenet121'], 'weights': str(tmp_path/'w.pth')})
    with pytest.raises(ValueError, match='expects volumes'): tw(torch.rand(2, 3, 32, 32, 32))
    vit = _tower('vit')
    with pytest.raises(ValueError, match='built for volumes of'): vit(torch.rand(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match='at least 29 voxels'): _tower('densenet121')(torch.rand(1, 1, 28, 64, 64))
    with pytest.raises(ValueError, match="unknown option 'patch_size'"): build_tower({'type': 'monai_3d', 'patch_size': [8, 8, 8]})


def test_group_norm_is_batch_independent():
    tw = _tower('resnet18_group').train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in tw.modules())
    x = torch.rand(VOL)
    with torch.no_grad(): torch.testing.assert_close(tw(x)[1:], tw(x[1:]), rtol=1e-4, atol=1e-5)


def test_dataset_volumes_and_stacks_through_the_towers(shards):
    "Real items: a 3D batch from the loader through a 3D tower, a 2.5D batch through a slices tower."
    from rwid_nb.data.dataset import ImageReportDataset, make_loader
    d3 = ImageReportDataset(shards, split=None, kind='3d', size=(32, 32, 32))
    b = next(iter(make_loader(d3, batch_size=2, workers=0)))
    tw = _tower('vit').eval()
    with torch.no_grad(): assert tw(b['image']).shape == (2, tw.out_dim)
    d25 = ImageReportDataset(shards, split=None, kind='2.5d', size=64, slices=5)
    b = next(iter(make_loader(d25, batch_size=2, workers=0)))
    assert b['image'].shape == (2, 5, 64, 64)
    st = build_tower({'type': 'slices', 'tower': 'efficientnet_lite0', 'slices': 5}, pretrained=False).eval()
    with torch.no_grad(): assert st(b['image']).shape == (2, st.out_dim) == (2, 1280)


@pytest.mark.parametrize('S', [3, 5])
def test_slices_match_each_slice_through_the_2d_tower(shards, S):
    "Normalised 2.5D items (the dataset's S == 3 per-channel quirk included) give the mean of the 2D tower over slices."
    from rwid_nb.data.dataset import ImageReportDataset
    normed = ImageReportDataset(shards, split=None, kind='2.5d', size=64, slices=S, augment=False)
    unit = ImageReportDataset(shards, split=None, kind='2.5d', size=64, slices=S, augment=False, normalize=False)
    x, raw = normed[0]['image'][None], unit[0]['image'][None]
    torch.manual_seed(0)
    st = build_tower({'type': 'slices', 'tower': 'efficientnet_lite0', 'pool': 'mean', 'slices': S}, pretrained=True).eval()
    su = build_tower({**st.spec, 'input': 'unit'}, pretrained=False).eval()
    su.load_state_dict(st.state_dict())
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        by_hand = st.encoder((raw[0][:, None].expand(-1, 3, -1, -1) - m)/s).mean(0, keepdim=True)
        torch.testing.assert_close(st(x), by_hand, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(su(raw), by_hand, rtol=1e-4, atol=1e-4)


def test_slices_attention_pool_is_a_set_function_and_trains():
    torch.manual_seed(0)
    st = build_tower({'type': 'slices', 'tower': 'efficientnet_lite0', 'pool': 'attention', 'slices': 4}).eval()  # ImageNet features
    mean = build_tower({**st.spec, 'pool': 'mean'}, pretrained=False).eval()
    mean.load_state_dict(st.state_dict(), strict=False)
    x = torch.randn(2, 4, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(st(x), mean(x), rtol=1e-5, atol=1e-5)    # starts as the mean pool
        nn.init.normal_(st.pool.w.weight, std=1.0)
        assert not torch.allclose(st(x), mean(x), atol=1e-4)
        perm = torch.tensor([2, 0, 3, 1])
        torch.testing.assert_close(st(x[:, perm]), st(x), rtol=1e-4, atol=1e-4)   # slice order is not used (documented)
        w = st.slice_weights(x)
        torch.testing.assert_close(st.slice_weights(x[:, perm]), w[:, perm])
        torch.testing.assert_close(w.sum(1), torch.ones(2))
    st.train()(x).square().mean().backward()
    assert st.pool.w.weight.grad.abs().sum() > 0 and st.encoder.net._conv_stem.weight.grad.abs().sum() > 0
    assert st.blocks()[-1] is st.pool and len(st.blocks()) == len(st.encoder.blocks()) + 1
    twin = build_tower(json.loads(json.dumps(st.spec)), pretrained=False).eval()
    twin.load_state_dict(st.state_dict())
    with torch.no_grad(): assert torch.equal(twin.eval()(x), st.eval()(x))


def test_slices_errors():
    with pytest.raises(ValueError, match='must be a 2d ImageTower'): build_tower({'type': 'slices', 'tower': {'type': 'monai_3d'}})
    with pytest.raises(ValueError, match='pool must be one of'): build_tower({'type': 'slices', 'pool': 'max'}, pretrained=False)
    with pytest.raises(ValueError, match="unknown option 'slice'"): build_tower({'type': 'slices', 'slice': 3}, pretrained=False)
    st = build_tower({'type': 'slices'}, pretrained=False)
    with pytest.raises(ValueError, match=r'expects slice stacks \(B, S, H, W\)'): st(torch.rand(1, 1, 3, 32, 32))
