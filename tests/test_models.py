"""Towers and the CLIP model: exact save/load round trips, fine-tuning modes, LoRA, HF checkpoint folders."""
import copy, json, math
import pytest
import torch
import torch.nn.functional as F

from rwid_nb.models.towers import (IMAGENET_MEAN, IMAGENET_STD, build_tower, hf_clip_parts, tiny_hf_folder,
                                   EfficientNetLiteTower, HFTextTower, HFVisionTower)
from rwid_nb.models.clip import (ClipModel, configure_finetuning, load_adapter, merge_lora, param_groups,
                                 save_adapter, trainable_summary)

TEXTS = ['No acute cardiopulmonary abnormality.', 'Right lower lobe consolidation.',
         'Small left pleural effusion.', 'Stable cardiomegaly without edema.']


def _is_lora(name): return any(part.startswith('lora_') for part in name.split('.'))
def _in_tower(name): return name.startswith(('image_tower.', 'text_tower.'))


def _grey_pair(n=2, h=32, w=32, seed=0):
    "The same grey image normalised the project's two ways: 1 channel (averaged stats) and 3 channels (per channel)."
    g = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))
    one = (g - sum(IMAGENET_MEAN)/3)/(sum(IMAGENET_STD)/3)
    three = (g.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))/torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return one, three


@pytest.fixture(scope='module')
def default_model():
    "The default generic towers (EfficientNet-Lite0 + MiniLM-L6), loaded once; tests deep-copy before changing it."
    return ClipModel.from_specs()


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp('hf')
    return {k: tiny_hf_folder(k, root/k) for k in ('vit', 'convnext', 'swin', 'bert', 'clip', 'siglip')}


def tiny_model(hf, **kw):
    return ClipModel.from_specs(image=str(hf['vit']), text=str(hf['bert']), embed_dim=8, **kw)


def outputs(model, images, texts=TEXTS[:2]):
    model.eval()
    with torch.no_grad(): return model(images, **model.tokenize(texts))


def assert_same_outputs(a, b):
    for k in ('image_embeds', 'text_embeds', 'logit_scale'): assert torch.equal(a[k], b[k]), k
    assert (a['logit_bias'] is None) == (b['logit_bias'] is None)
    if a['logit_bias'] is not None: assert torch.equal(a['logit_bias'], b['logit_bias'])


def randomise_lora(model, seed=0):
    "peft starts lora_B at zero (a no-op); give every adapter weight a value so round trips test something."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if _is_lora(n): p.copy_(torch.randn(p.shape, generator=g)*0.05)


# ---------------------------------------------------------------- default towers

def test_default_round_trip_exact(default_model, tmp_path):
    images = torch.randn(2, 3, 64, 64)
    ref = outputs(default_model, images)
    default_model.save_pretrained(tmp_path/'m')
    assert {p.name for p in (tmp_path/'m').iterdir()} == {'config.json', 'model.safetensors', 'tokenizer'}
    back = ClipModel.from_pretrained(tmp_path/'m')
    assert_same_outputs(outputs(back, images), ref)
    assert back.config == default_model.config
    a, b = default_model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_towers_shapes_and_grey(default_model):
    assert isinstance(default_model.image_tower, EfficientNetLiteTower) and default_model.image_tower.out_dim == 1280
    assert isinstance(default_model.text_tower, HFTextTower) and default_model.text_tower.out_dim == 384
    one, three = _grey_pair(h=48, w=64)
    with torch.no_grad():
        e1, e3 = default_model.eval().encode_image(one), default_model.encode_image(three)
    assert e1.shape == (2, 256)
    torch.testing.assert_close(e1, e3, atol=1e-4, rtol=0)
    # the pretrained weights are loaded: a random-initialised tower computes something else
    rnd = build_tower('efficientnet_lite0', pretrained=False).eval()
    with torch.no_grad(): assert not torch.allclose(rnd(three), default_model.image_tower(three), atol=1e-3)


def test_settings_names_are_aliases():
    t = build_tower('all-minilm-l6-v2')
    assert t.spec['type'] == 'minilm_l6' and 'path' not in t.spec  # nothing machine-specific


def test_lora_default_towers_trains_only_adapters_and_heads(default_model, tmp_path):
    m = copy.deepcopy(default_model)
    s = configure_finetuning(m, 'lora', lora_r=4)
    assert 0 < s['image_tower']['trainable'] < s['image_tower']['total'] / 10
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if _is_lora(n) or not _in_tower(n)}
    assert any(_is_lora(n) and n.startswith('image_tower.') for n in trainable)
    assert any(_is_lora(n) and n.startswith('text_tower.') for n in trainable)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    opt = torch.optim.AdamW(param_groups(m, lr=1e-2))
    for _ in range(2):  # two steps: the second moves lora_A too (lora_B is zero at the first)
        opt.zero_grad()
        o = m(torch.randn(4, 3, 64, 64), **m.tokenize(TEXTS))
        (o['image_embeds'] @ o['text_embeds'].T * o['logit_scale']).diagonal().mean().neg().backward()
        opt.step()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= trainable, sorted(changed - trainable)[:5]  # no frozen weight, no BatchNorm statistic moved
    assert {n for n in changed if _is_lora(n)} == {n for n in trainable if _is_lora(n)}
    # merged save loads as a plain model; unmerged save reloads the adapters bitwise
    images = torch.randn(2, 3, 64, 64)
    ref = outputs(m, images)
    m.save_pretrained(tmp_path/'merged'); m.save_pretrained(tmp_path/'adapters', merge_lora=False)
    plain, adapted = ClipModel.from_pretrained(tmp_path/'merged'), ClipModel.from_pretrained(tmp_path/'adapters')
    assert plain.lora == {} and not any(_is_lora(k) for k in plain.state_dict())
    assert_same_outputs(outputs(adapted, images), ref)
    p = outputs(plain, images)
    for k in ('image_embeds', 'text_embeds'): torch.testing.assert_close(p[k], ref[k], atol=1e-5, rtol=0)
    merged = merge_lora(copy.deepcopy(m))  # merging in memory and saving merged give the same model exactly
    assert_same_outputs(outputs(merged, images), p)


def test_partial_unfreezing_default(default_model):
    m = copy.deepcopy(default_model)
    s = configure_finetuning(m, 'heads', unfreeze_last=2)
    for tower in (m.image_tower, m.text_tower):
        blocks = tower.blocks()
        last = {id(p) for b in blocks[-2:] for p in b.parameters()}
        assert last and all(p.requires_grad == (id(p) in last) for p in tower.parameters())
    assert s['heads']['trainable'] == s['heads']['total']
    assert s['image_tower']['trainable'] == sum(p.numel() for b in m.image_tower.blocks()[-2:] for p in b.parameters())
    # the frozen blocks' BatchNorm statistics do not move during training; the unfrozen ones' do
    m.train()
    bn_frozen, bn_open = m.image_tower.net._bn0, m.image_tower.net._bn1
    r0, r1 = bn_frozen.running_mean.clone(), bn_open.running_mean.clone()
    m.encode_image(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn_frozen.running_mean, r0) and not torch.equal(bn_open.running_mean, r1)


# ---------------------------------------------------------------- fine-tuning modes (tiny towers)

@pytest.mark.parametrize('mode,frozen', [('full', ()), ('heads', ('image', 'text')),
                                         ('frozen_image', ('image',)), ('frozen_text', ('text',))])
def test_modes_freeze_what_they_say(hf, mode, frozen):
    m = tiny_model(hf)
    configure_finetuning(m, 'heads')  # reconfiguring starts from scratch
    s = configure_finetuning(m, mode)
    for name, tower in (('image', m.image_tower), ('text', m.text_tower)):
        want = name not in frozen
        assert all(p.requires_grad == want for p in tower.parameters()), (mode, name)
    assert s['heads']['trainable'] == s['heads']['total'] > 0
    assert m.log_logit_scale.requires_grad


def test_unfreeze_last_counts_blocks(hf):
    m = tiny_model(hf)
    nb = len(m.text_tower.blocks())
    assert nb == 3  # embeddings + 2 layers
    configure_finetuning(m, 'frozen_text', unfreeze_last=1)
    enc_last = m.text_tower.model.encoder.layer[-1]
    open_ = {id(p) for p in enc_last.parameters()}
    assert all(p.requires_grad == (id(p) in open_) for p in m.text_tower.parameters())
    assert all(p.requires_grad for p in m.image_tower.parameters())
    with pytest.raises(ValueError, match='has 3 blocks'): configure_finetuning(m, 'heads', unfreeze_last=nb + 1)
    with pytest.raises(ValueError, match='needs a frozen tower'): configure_finetuning(m, 'full', unfreeze_last=1)
    with pytest.raises(ValueError, match='unknown fine-tuning mode'): configure_finetuning(m, 'everything')


@pytest.mark.parametrize('towers', [('image',), ('text',), ('image', 'text')])
def test_lora_tiny_round_trips(hf, tmp_path, towers):
    m = tiny_model(hf)
    configure_finetuning(m, 'lora', lora_towers=towers, lora_r=2)
    assert sorted(m.lora) == sorted(towers)
    for name, tower in (('image', m.image_tower), ('text', m.text_tower)):
        has = any(_is_lora(n) for n, _ in tower.named_parameters())
        assert has == (name in towers)
        assert all(p.requires_grad == _is_lora(n) for n, p in tower.named_parameters())
    randomise_lora(m)
    images = torch.randn(2, 3, 32, 32)
    ref = outputs(m, images)
    m.save_pretrained(tmp_path/'a', merge_lora=False)
    back = ClipModel.from_pretrained(tmp_path/'a')
    assert back.lora == m.lora
    assert_same_outputs(outputs(back, images), ref)
    # an unmerged folder resumes LoRA training with its adapters; other settings are refused
    configure_finetuning(back, 'lora', lora_towers=towers, lora_r=2)
    with pytest.raises(ValueError, match='already has LoRA adapters'): configure_finetuning(back, 'lora', lora_towers=towers, lora_r=4)
    with pytest.raises(ValueError, match='carries LoRA adapters'): configure_finetuning(back, 'full')
    m.save_pretrained(tmp_path/'b')  # merged (default)
    plain = ClipModel.from_pretrained(tmp_path/'b')
    assert json.loads((tmp_path/'b'/'config.json').read_text())['lora'] is None
    assert_same_outputs(outputs(plain, images), outputs(merge_lora(copy.deepcopy(m)), images))
    for k in ('image_embeds', 'text_embeds'): torch.testing.assert_close(outputs(plain, images)[k], ref[k], atol=1e-5, rtol=0)
    assert m.lora  # saving merged leaves the model itself unmerged


def test_adapter_files(hf, tmp_path):
    m = tiny_model(hf)
    base_sd = copy.deepcopy(m.state_dict())
    configure_finetuning(m, 'lora', lora_r=2)
    randomise_lora(m)
    with torch.no_grad(): m.image_proj.weight.add_(1.0)
    save_adapter(m, tmp_path/'ad')
    f = tmp_path/'ad'/'adapter_model.safetensors'
    from safetensors.torch import load_file
    keys = set(load_file(str(f)))
    assert keys and all(_is_lora(k) or not _in_tower(k) for k in keys)
    fresh = tiny_model(hf)
    fresh.load_state_dict(base_sd)
    load_adapter(fresh, tmp_path/'ad')
    images = torch.randn(2, 3, 32, 32)
    assert_same_outputs(outputs(fresh, images), outputs(m, images))
    with pytest.raises(ValueError, match='no LoRA adapters'): save_adapter(tiny_model(hf), tmp_path/'none')
    with pytest.raises(ValueError, match='was trained on'): load_adapter(tiny_model(hf, loss='siglip'), tmp_path/'ad')


def test_param_groups(hf):
    m = tiny_model(hf, loss='siglip')
    configure_finetuning(m, 'frozen_image')
    pg = param_groups(m, lr=1e-3, tower_lr=1e-5, weight_decay=0.2)
    grouped = [p for g in pg for p in g['params']]
    assert len(grouped) == len({id(p) for p in grouped}) == sum(p.requires_grad for p in m.parameters())
    by = {g['name']: g for g in pg}
    assert set(by) == {'towers/decay', 'towers/no_decay', 'heads/decay', 'heads/no_decay'}
    assert by['towers/decay']['lr'] == 1e-5 and by['heads/decay']['lr'] == 1e-3
    assert by['heads/decay']['weight_decay'] == 0.2 and by['heads/no_decay']['weight_decay'] == 0.0
    nd = {id(p) for p in by['heads/no_decay']['params']} | {id(p) for p in by['towers/no_decay']['params']}
    assert id(m.log_logit_scale) in nd and id(m.logit_bias) in nd
    assert id(m.text_tower.model.embeddings.word_embeddings.weight) in nd
    assert all(p.ndim >= 2 for g in pg if g['weight_decay'] > 0 for p in g['params'])
    assert not any(p is q for p in m.image_tower.parameters() for q in grouped)  # frozen: not grouped


# ---------------------------------------------------------------- HF checkpoint folders

@pytest.mark.parametrize('kind', ['vit', 'convnext', 'swin'])
def test_hf_vision_folder_loads_and_rebuilds(hf, kind):
    t = build_tower(str(hf[kind])).eval()
    assert isinstance(t, HFVisionTower)
    rebuilt = build_tower(json.loads(json.dumps(t.spec)), pretrained=False).eval()
    rebuilt.load_state_dict(t.state_dict())
    one, three = _grey_pair()
    with torch.no_grad():
        out = t(three)
        assert out.shape == (2, t.out_dim)
        assert torch.equal(rebuilt(three), out)
        torch.testing.assert_close(t(one), out, atol=1e-5, rtol=0)  # 1-channel input
    assert sum(p.numel() for b in t.blocks() for p in b.parameters()) == sum(p.numel() for p in t.parameters())
    assert t.lora_targets()


def test_hf_vision_weights_come_from_the_folder(hf, tmp_path):
    a = build_tower(str(hf['vit'])).eval()
    b = build_tower(str(tiny_hf_folder('vit', tmp_path/'other', seed=1))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert not torch.allclose(a(x), b(x))
    with torch.no_grad(): assert a(torch.randn(1, 3, 48, 48)).shape == (1, a.out_dim)  # other sizes: interpolated


def test_hf_text_folder(hf):
    t = build_tower(str(hf['bert'])).eval()
    assert isinstance(t, HFTextTower) and t.spec['type'] == 'hf_text' and t.out_dim == 32
    tok = t.tokenize(TEXTS)
    with torch.no_grad():
        e = t(**tok)
        alone = t(**t.tokenize(TEXTS[:1]))
    torch.testing.assert_close(alone[0], e[0], atol=1e-5, rtol=0)  # padding does not change mean pooling
    cls = build_tower({'type': 'hf_text', 'path': str(hf['bert']), 'pooling': 'cls'}).eval()
    with torch.no_grad(): assert not torch.allclose(cls(**tok), e)
    assert t.tokenize(TEXTS, max_length=5)['input_ids'].shape == (4, 5)


@pytest.mark.parametrize('kind', ['clip', 'siglip'])
def test_hf_clip_folder(hf, tmp_path, kind):
    from transformers import AutoModel
    ours = ClipModel.from_hf_clip(hf[kind])
    ref = AutoModel.from_pretrained(str(hf[kind])).eval()
    assert ours.loss == kind and (ours.logit_bias is not None) == (kind == 'siglip')
    one, three = _grey_pair()
    mean, std = torch.tensor(ours.image_tower.mean).view(1, 3, 1, 1), torch.tensor(ours.image_tower.std).view(1, 3, 1, 1)
    raw = three*torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    tok = ours.tokenize(TEXTS[:2])
    with torch.no_grad():
        o = ours(three, **tok)
        hi = ref.get_image_features(pixel_values=(raw - mean)/std)
        ht = ref.get_text_features(**tok)
    hi, ht = [getattr(v, 'pooler_output', v) for v in (hi, ht)]
    torch.testing.assert_close(o['image_embeds'], F.normalize(hi, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(o['text_embeds'], F.normalize(ht, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(o['logit_scale'], ref.logit_scale.exp().detach().reshape(()), atol=1e-6, rtol=0)
    if kind == 'siglip': assert o['logit_bias'].item() == ref.logit_bias.item()
    with torch.no_grad(): torch.testing.assert_close(ours.encode_image(one), o['image_embeds'], atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path/'saved')
    assert_same_outputs(outputs(ClipModel.from_pretrained(tmp_path/'saved'), three), outputs(ours, three))
    # LoRA on the CLIP towers, saved unmerged, round-trips too
    configure_finetuning(ours, 'lora', lora_r=2)
    randomise_lora(ours)
    ours.save_pretrained(tmp_path/'lora', merge_lora=False)
    assert_same_outputs(outputs(ClipModel.from_pretrained(tmp_path/'lora'), three), outputs(ours, three))


def test_whole_clip_folder_is_not_a_tower(hf):
    with pytest.raises(ValueError, match='from_hf_clip'): build_tower(str(hf['clip']))
    # ... but either half of it is
    t = build_tower({'type': 'hf_vision', 'path': str(hf['clip'])})
    assert t.spec['config']['model_type'] == 'clip_vision_model'
    parts = hf_clip_parts(hf['clip'])
    assert parts['image_proj'].shape == (16, 32) and parts['kind'] == 'clip'


# ---------------------------------------------------------------- folders, checkpointing, errors

def test_save_is_atomic_and_careful(hf, tmp_path):
    m = tiny_model(hf)
    (tmp_path/'run').mkdir(); (tmp_path/'run'/'metrics.jsonl').write_text('{}\n')
    with pytest.raises(FileExistsError, match='not a model folder'): m.save_pretrained(tmp_path/'run')
    assert (tmp_path/'run'/'metrics.jsonl').exists()
    m.save_pretrained(tmp_path/'m')
    with torch.no_grad(): m.image_proj.weight.add_(1.0)
    m.save_pretrained(tmp_path/'m')  # replaces the earlier model
    back = ClipModel.from_pretrained(tmp_path/'m')
    assert torch.equal(back.image_proj.weight, m.image_proj.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m', 'run']  # no staging folders left
    # a failure while writing leaves the old model in place
    class Boom(Exception): pass
    def boom(path): raise Boom()
    m.text_tower.save_tokenizer = boom
    with pytest.raises(Boom): m.save_pretrained(tmp_path/'m')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m', 'run']
    assert torch.equal(ClipModel.from_pretrained(tmp_path/'m').image_proj.weight, back.image_proj.weight)
    with pytest.raises(FileNotFoundError, match='no config.json'): ClipModel.from_pretrained(tmp_path/'run')


def test_siglip_and_mlp_heads(hf, tmp_path):
    m = tiny_model(hf, loss='siglip', proj='mlp')
    o = outputs(m, torch.randn(2, 1, 32, 32))  # 1-channel input through the model
    assert o['logit_bias'].item() == -10.0 and math.isclose(o['logit_scale'].item(), 10.0, rel_tol=1e-5)
    m.save_pretrained(tmp_path/'s')
    x = torch.randn(2, 3, 32, 32)
    assert_same_outputs(outputs(ClipModel.from_pretrained(tmp_path/'s'), x), outputs(m, x))


def test_grad_checkpointing_same_gradients(hf):
    torch.manual_seed(0)
    a = build_tower({'type': 'efficientnet_lite0', 'drop_connect_rate': 0.0}, pretrained=False)
    b = copy.deepcopy(a); b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    for t in (a, b):
        t.train(); t(x).square().mean().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
    for (n, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(u, v), n  # BatchNorm statistics updated once, not twice
    vit = build_tower(str(hf['vit']))
    vit.set_grad_checkpointing(True); vit.train()
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in vit.parameters())
    vit.set_grad_checkpointing(False)


def test_every_trainable_parameter_gets_a_gradient(hf):
    "DDP fails on parameters that never receive a gradient (an unused pooler, say)."
    m = tiny_model(hf, loss='siglip')
    m.train()
    o = m(torch.randn(2, 3, 32, 32), **m.tokenize(TEXTS[:2]))
    (o['image_embeds'] @ o['text_embeds'].T * o['logit_scale'] + o['logit_bias']).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
