"""Contrastive losses against loop-by-loop float64 references, retrieval metrics on constructed cases, and a
2-process torchrun (gloo, DistributedDataParallel) run that must match one process on the global batch."""
import math, os, socket, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rwid_nb.models.losses import (ContrastiveLoss, clip_loss, siglip_loss, soft_clip_loss, soft_targets,
                                   label_agreement, group_ids, gather_features, retrieval_metrics)

nan = float('nan')


# ---------------------------------------------------------------- references (plain Python / numpy, float64)
def _lse(v): m = max(v); return m + math.log(sum(math.exp(x - m) for x in v))

def _logits(img, txt, s):
    img, txt = np.asarray(img, dtype=np.float64), np.asarray(txt, dtype=np.float64)
    B = len(img)
    return [[s * sum(img[i, d] * txt[j, d] for d in range(img.shape[1])) for j in range(B)] for i in range(B)]

def ref_clip(img, txt, s):
    L = _logits(img, txt, s); B = len(L)
    i2t = [-L[i][i] + _lse(L[i]) for i in range(B)]
    t2i = [-L[j][j] + _lse([L[i][j] for i in range(B)]) for j in range(B)]
    return (sum(i2t) / B + sum(t2i) / B) / 2

def _same(groups, i, j):
    if groups is None: return i == j
    gi, gj = np.atleast_1d(groups[i]), np.atleast_1d(groups[j])
    return i == j or any(a == b for a, b in zip(gi, gj))

def ref_siglip(img, txt, t, b, groups=None):
    L = _logits(img, txt, t); B = len(L)
    total = 0.
    for i in range(B):
        for j in range(B):
            z = 1. if _same(groups, i, j) else -1.
            total += math.log1p(math.exp(-z * (L[i][j] + b)))   # -log sigmoid(z (t x.y + b))
    return total / B

def ref_agreement(a, b, unmentioned='unknown'):
    "Jaccard overlap of stated findings, 0 on any conflict or when neither states anything."
    a = [0. if (unmentioned == 'negative' and math.isnan(v)) else v for v in a]
    b = [0. if (unmentioned == 'negative' and math.isnan(v)) else v for v in b]
    both = [f for f in range(len(a)) if not math.isnan(a[f]) and not math.isnan(b[f])]
    either = [f for f in range(len(a)) if not math.isnan(a[f]) or not math.isnan(b[f])]
    if not either or any(a[f] != b[f] for f in both): return 0.
    return len(both) / len(either)

def ref_soft(img, txt, s, labels, w, groups=None, unmentioned='unknown'):
    L = _logits(img, txt, s); B = len(L); lab = np.asarray(labels, dtype=np.float64).tolist()
    A = [[1. if _same(groups, i, j) else w * ref_agreement(lab[i], lab[j], unmentioned) for j in range(B)] for i in range(B)]
    i2t = 0.
    for i in range(B):   # image i over texts j: row i of A, normalised over j
        z = sum(A[i]); lse = _lse(L[i])
        i2t += -sum(A[i][j] / z * (L[i][j] - lse) for j in range(B))
    t2i = 0.
    for j in range(B):   # text j over images i: column j of A, normalised over i
        col = [A[i][j] for i in range(B)]; z = sum(col); lse = _lse([L[i][j] for i in range(B)])
        t2i += -sum(col[i] / z * (L[i][j] - lse) for i in range(B))
    return (i2t / B + t2i / B) / 2


# ---------------------------------------------------------------- fixtures
def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)

LABELS = torch.tensor([[0., 0, 0, nan], [0, 0, 0, nan], [0, 0, nan, nan], [1, 0, nan, nan], [1, 0, nan, nan],
                       [-1, nan, nan, 0], [nan, nan, nan, nan], [0, 1, -1, nan], [nan, nan, nan, nan]], dtype=torch.float64)
GROUPS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0])   # items 0 and 8: one study


def test_clip_matches_reference():
    img, txt = _unit(9, 5, 0), _unit(9, 5, 1)
    for s in (1., 7.3, 60.):
        assert clip_loss(img, txt, torch.tensor(s, dtype=torch.float64)).item() == pytest.approx(ref_clip(img, txt, s), abs=1e-9)


def test_siglip_matches_reference():
    img, txt = _unit(9, 5, 2), _unit(9, 5, 3)
    for t, b in ((10., -10.), (3.1, 0.7)):
        assert siglip_loss(img, txt, t, b).item() == pytest.approx(ref_siglip(img, txt, t, b), abs=1e-9)
    assert siglip_loss(img, txt, 5., -2., groups=GROUPS).item() == pytest.approx(ref_siglip(img, txt, 5., -2., GROUPS.numpy()), abs=1e-9)
    assert siglip_loss(img, txt, 5., -2., groups=GROUPS).item() != pytest.approx(siglip_loss(img, txt, 5., -2.).item(), abs=1e-6)


def test_label_agreement_matches_reference():
    for unm in ('unknown', 'negative'):
        got = label_agreement(LABELS, unmentioned=unm).numpy()
        ref = np.array([[ref_agreement(a, b, unm) for b in LABELS.tolist()] for a in LABELS.tolist()])
        np.testing.assert_allclose(got, ref, atol=1e-12)


def test_soft_matches_reference():
    img, txt = _unit(9, 5, 4), _unit(9, 5, 5)
    for w, groups, unm in ((0.3, None, 'unknown'), (1., None, 'unknown'), (0.5, GROUPS, 'unknown'),
                           (0., GROUPS, 'unknown'), (0.8, None, 'negative')):
        got = soft_clip_loss(img, txt, 8., LABELS, weight=w, groups=groups, unmentioned=unm).item()
        ref = ref_soft(img, txt, 8., LABELS, w, None if groups is None else groups.numpy(), unm)
        assert got == pytest.approx(ref, abs=1e-9), (w, unm)
    # the soft targets differ from the identity where labels repeat, so the check above is not clip's in disguise
    assert soft_clip_loss(img, txt, 8., LABELS, weight=1.).item() != pytest.approx(clip_loss(img, txt, 8.).item(), abs=1e-4)


def test_soft_targets_rows_and_lonely_rows():
    t = soft_targets(LABELS, weight=0.5)
    np.testing.assert_allclose(t.sum(1).numpy(), np.ones(9), atol=1e-12)
    assert t[6, 6] == 1 and t[8, 8] == 1        # no known labels: only itself
    assert t[0, 1] > 0 and t[0, 3] == 0          # same statements share; effusion 0 vs 1 never does


def test_soft_weight0_equals_clip_exactly():
    for dtype in (torch.float32, torch.float64):
        img, txt = _unit(16, 8, 6, dtype), _unit(16, 8, 7, dtype)
        lab = torch.zeros(16, 3, dtype=dtype)      # all identical: the most soft-target mass there could be
        assert torch.equal(soft_clip_loss(img, txt, 13., lab, weight=0.), clip_loss(img, txt, 13.))
        assert torch.equal(ContrastiveLoss('soft', weight=0.)(img, txt, 13., labels=lab), clip_loss(img, txt, 13.))


def test_gradients_finite_at_extremes():
    img = _unit(8, 4, 8, torch.float32).requires_grad_()
    txt0 = _unit(8, 4, 9, torch.float32); txt0[1] = txt0[0]   # a duplicate text
    txt = txt0.clone().requires_grad_()
    scale, bias = torch.tensor(100., requires_grad=True), torch.tensor(-10., requires_grad=True)
    lab = torch.full((8, 3), nan); lab[:4] = 0
    for kind, kw in (('clip', {}), ('siglip', dict(logit_bias=bias)), ('soft', dict(labels=lab))):
        for p in (img, txt, scale, bias): p.grad = None
        loss = ContrastiveLoss(kind, **({'weight': 1.} if kind == 'soft' else {}))(img, txt, scale, **kw)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in (img, txt, scale))
        assert img.grad.abs().sum() > 0


def test_half_precision_is_upcast():
    img, txt = _unit(8, 4, 10, torch.float32), _unit(8, 4, 11, torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = clip_loss(img.bfloat16(), txt.bfloat16(), 50.)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(clip_loss(img.bfloat16().float(), txt.bfloat16().float(), 50.).item(), abs=1e-5)


def test_contrastive_loss_rejects_bad_input():
    img, txt = _unit(4, 3, 0), _unit(4, 3, 1)
    with pytest.raises(ValueError, match='needs logit_bias'): ContrastiveLoss('siglip')(img, txt, 10.)
    with pytest.raises(ValueError, match='needs labels'): ContrastiveLoss('soft')(img, txt, 10.)
    with pytest.raises(ValueError, match='takes no groups'): ContrastiveLoss('clip')(img, txt, 10., groups=[1, 2, 3, 4])
    with pytest.raises(ValueError, match='unknown loss kind'): ContrastiveLoss('nce')
    with pytest.raises(ValueError, match=r'\(B, D\)'): ContrastiveLoss()(img, txt[:3], 10.)
    with pytest.raises(ValueError, match='must be 1 \\(positive\\)'): soft_clip_loss(img, txt, 10., torch.full((4, 2), 2.))


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert gather_features(x) is x


# ---------------------------------------------------------------- retrieval metrics
def ref_ranks(sim, groups=None):
    "1-based rank of the best positive of each row; ties counted against it."
    out = []
    for i, row in enumerate(sim):
        pos = [j for j in range(len(row)) if (j == i or (groups is not None and groups[i] == groups[j]))]
        best = max(row[j] for j in pos)
        out.append(1 + sum(1 for j in range(len(row)) if j not in pos and row[j] >= best))
    return np.array(out)


def test_retrieval_constructed_case():
    # texts are the unit vectors of a permutation: item i's text is image perm[i]; a fixed point is found at rank 1,
    # a moved item's own text scores 0 and ties with every other wrong text except the one equal to its image: rank N
    N = 12; perm = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 8]
    img, txt = torch.eye(N), torch.eye(N)[perm]
    m = retrieval_metrics(img, txt, ks=(1, 5, 12))
    assert m['i2t_R@1'] == pytest.approx(8 / 12) and m['i2t_R@5'] == pytest.approx(8 / 12) and m['i2t_R@12'] == 1.
    assert m['t2i_R@1'] == pytest.approx(8 / 12) and m['i2t_median_rank'] == 1.
    assert m['i2t_mean_rank'] == pytest.approx((8 * 1 + 4 * N) / N)
    # grouping the 4 moved items as one study makes each find a text of its study first
    g = [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8]
    assert retrieval_metrics(img, txt, ks=(1,), groups=g)['i2t_R@1'] == 1.
    assert retrieval_metrics(img, txt, ks=(1,), groups=[f'study{k}' for k in g])['t2i_R@1'] == 1.
    # a collapsed model is not rewarded by ties
    assert retrieval_metrics(torch.ones(6, 3), torch.ones(6, 3), ks=(1, 5))['i2t_R@5'] == 0.


def test_retrieval_matches_reference_on_random_data():
    img, txt = _unit(40, 6, 12, torch.float32), _unit(40, 6, 13, torch.float32)
    txt[:10] = F.normalize(img[:10] + 0.3 * txt[:10], dim=1)
    groups = np.arange(40) // 3
    for g in (None, groups):
        m = retrieval_metrics(img, txt, ks=(1, 5, 10), groups=None if g is None else torch.as_tensor(g))
        sim = (img.double() @ txt.double().T).numpy()
        for name, s in (('i2t', sim), ('t2i', sim.T)):
            r = ref_ranks(s, g)
            for k in (1, 5, 10): assert m[f'{name}_R@{k}'] == pytest.approx((r <= k).mean())
            assert m[f'{name}_median_rank'] == np.sort(r)[(len(r) - 1) // 2]   # torch.median: the lower middle
            assert m[f'{name}_mean_rank'] == pytest.approx(r.mean())


# ---------------------------------------------------------------- two processes (torchrun, gloo, DDP)
class Towers(nn.Module):
    "Two linear towers, a temperature and (for SigLIP) a bias."
    def __init__(self, with_bias:bool):
        super().__init__()
        self.img, self.txt = nn.Linear(6, 4), nn.Linear(5, 4)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.)))
        self.bias = nn.Parameter(torch.tensor(-3.)) if with_bias else None
    def forward(self, x, y):
        return F.normalize(self.img(x), dim=1), F.normalize(self.txt(y), dim=1), self.log_scale.exp(), self.bias


def make_problem():
    "A global batch of 12 pairs (float64), with repeated label sets, NaN, -1 and two multi-item studies."
    g = torch.Generator().manual_seed(42)
    x, y = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0., 0, nan]] * 5 + [[1, nan, 0]] * 3 + [[nan, nan, nan], [-1, 0, nan], [0, 1, 1], [nan, nan, nan]],
                          dtype=torch.float64)
    groups = torch.tensor([0, 1, 2, 3, 0, 5, 6, 7, 8, 9, 6, 11])
    return x, y, labels, groups

COUNTS = [7, 5]   # uneven on purpose: the last batch of an epoch
CONFIGS = [('clip', {}, True, True), ('clip', {}, False, True), ('siglip', {}, True, True), ('siglip', {}, False, True),
           ('siglip', {'groups': True}, True, True), ('soft', {'weight': 0.7}, True, True),
           ('soft', {'weight': 0.7}, False, True), ('soft', {'weight': 0.5, 'groups': True}, True, True),
           ('clip', {}, True, False)]   # last: gather=False, the per-rank-negatives control that must NOT match

WORKER = r'''
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, sys.argv[1])
from test_losses import Towers, make_problem, COUNTS, CONFIGS
from rwid_nb.models.losses import ContrastiveLoss, gather_features
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
x, y, labels, groups = make_problem()
lo, hi = sum(COUNTS[:rank]), sum(COUNTS[:rank + 1])
res = {}
for n, (kind, kw, local, gather) in enumerate(CONFIGS):
    kw = dict(kw); use_groups = kw.pop('groups', False)
    torch.manual_seed(0)
    model = DDP(Towers(kind == 'siglip').double())
    img, txt, scale, bias = model(x[lo:hi], y[lo:hi])
    loss = ContrastiveLoss(kind, gather=gather, local=local, **kw)(img, txt, scale, bias,
            labels=labels[lo:hi] if kind == 'soft' else None, groups=groups[lo:hi] if use_groups else None)
    loss.backward()
    res[n] = dict(loss=loss.item(), grads={k: p.grad.clone() for k, p in model.module.named_parameters()})
# the gather itself: values in rank order, and backward sums the ranks' gradients into each rank's own rows
xr = x[lo:hi].clone().requires_grad_()
g = gather_features(xr)
(g * (rank + 1)).sum().backward()
res['gather'] = dict(values=g.detach(), grad=xr.grad)
torch.save(res, sys.argv[2] + f'/rank{rank}.pt')
dist.destroy_process_group()
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _single_process(kind, kw):
    "Loss and gradients of one process on the whole batch, with the plain loss functions."
    kw = dict(kw); use_groups = kw.pop('groups', False)
    x, y, labels, groups = make_problem()
    torch.manual_seed(0)
    model = Towers(kind == 'siglip').double()
    img, txt, scale, bias = model(x, y)
    gr = groups if use_groups else None
    loss = {'clip': lambda: clip_loss(img, txt, scale), 'siglip': lambda: siglip_loss(img, txt, scale, bias, groups=gr),
            'soft': lambda: soft_clip_loss(img, txt, scale, labels, groups=gr, **kw)}[kind]()
    loss.backward()
    return loss.item(), {k: p.grad for k, p in model.named_parameters()}


def test_two_process_ddp_matches_single_process(tmp_path):
    script = tmp_path/'worker.py'; script.write_text(WORKER)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), str(script), str(Path(__file__).parent), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path/f'rank{k}.pt') for k in range(2)]
    x = make_problem()[0]
    # gather: every rank sees the global rows in order; each row's gradient is 1 + 2, summed over the ranks
    for res in ranks:
        torch.testing.assert_close(res['gather']['values'], x, rtol=0, atol=0)
        torch.testing.assert_close(res['gather']['grad'], torch.full_like(res['gather']['grad'], 3.))
    for n, (kind, kw, local, gather) in enumerate(CONFIGS):
        loss, grads = _single_process(kind, kw)
        for rank, res in enumerate(ranks):
            got = res[n]
            if not gather:   # the control: per-rank negatives give another loss and other gradients
                assert abs(got['loss'] - loss) > 1e-3 or any((got['grads'][k] - grads[k]).abs().max() > 1e-3 for k in grads)
                continue
            assert got['loss'] == pytest.approx(loss, abs=1e-10), (kind, kw, local, rank)
            for k in grads:
                torch.testing.assert_close(got['grads'][k], grads[k], rtol=1e-9, atol=1e-11, msg=f'{kind} {kw} local={local} {k}')
