"""Trainer throughput against a bare hand-written PyTorch loop: same model, batch, data and precision, in the same run.

Target (fine-tuning issue): the trainer reaches at least 0.9 of the bare loop's training samples/s; peak memory of
each is printed too.
Run: `.venv/bin/python bench/bench_train.py [--steps 12] [--batch-size 16] [--size 160] [--mode full] [--repeats 2]`

Both contenders get the same model (`build_model`: EfficientNet-Lite0 + MiniLM-L6, the default generic towers, with
fresh heads), the same `ImageReportDataset` + `make_loader` batches (augmented, 2 workers), the same tokenizer
call, the same loss (`ContrastiveLoss('clip')`), AdamW over the same parameter groups, and fp32 on the CPU.
- bare: tokenize, forward, loss, backward, `optimizer.step()`, `zero_grad()`, nothing else;
- trainer: `Trainer.fit` as `rwid train` runs it: per-step reseeding, mode handling, gradient clipping, the LR
  schedule, metrics.jsonl, offline W&B logging, the progress bar and the checkpoint at the end of the run.
Each contender runs in its own fresh Python process (so peak RSS is its own), alternating, `--repeats` times. The
headline compares steady-state steps (the median step time after two warm-up steps); the whole-run figure also
charges the trainer its end-of-run checkpoint. Validation is off for both (it is not training throughput).
"""
import argparse, json, os, resource, statistics, subprocess, sys, tempfile, time, shutil, warnings
from pathlib import Path

warnings.filterwarnings('ignore')
HERE = Path(__file__).resolve().parent


def build_shards(out, studies=60, seed=41):
    "A shards folder of phantom radiographs (CR, DX) with captions and a train split."
    from rwid_nb.data.phantom import generate_cohort
    from rwid_nb.data.dataset import phantom_shards
    if (out/'index.parquet').is_file(): return out
    cohort = out.parent/f'{out.name}-cohort'
    generate_cohort(cohort, studies, seed=seed, inject_phi=0.0, workers=os.cpu_count(), progress=False, overwrite=True,
                    modalities=['CR', 'DX'])
    phantom_shards(out, cohort, copies=4)
    shutil.rmtree(cohort, ignore_errors=True)
    return out


def config(a):
    from rwid_nb.train import TrainConfig
    return TrainConfig(size=a.size, batch_size=a.batch_size, epochs=1, max_steps=a.steps + 2, mode=a.mode, workers=2,
                       max_text_length=64, train_split=None, val_split=None, tracking_mode='offline',
                       tracking_project='rwid_nb-bench', warmup=1)


def run_bare(a, out):
    import torch
    from rwid_nb.train import build_model, build_datasets
    from rwid_nb.models.clip import param_groups
    from rwid_nb.models.losses import ContrastiveLoss
    from rwid_nb.data.dataset import make_loader
    cfg = config(a)
    ds, _ = build_datasets(cfg, a.shards)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.tower_lr, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ContrastiveLoss('clip')
    times, t_start = [], time.perf_counter()
    it = iter(make_loader(ds, cfg.batch_size, workers=cfg.workers, seed=cfg.seed))
    for k in range(a.steps + 2):
        t0 = time.perf_counter()
        b = next(it)
        tok = model.tokenize(b['caption'], max_length=cfg.max_text_length)
        o = model(b['image'], tok['input_ids'], tok['attention_mask'])
        loss = loss_fn(o['image_embeds'], o['text_embeds'], o['logit_scale'])
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return dict(step_s=statistics.median(times[2:]), whole_s=time.perf_counter() - t_start, steps=len(times))


def run_trainer(a, out):
    from rwid_nb.train import train
    t0 = time.perf_counter()
    s = train(a.shards, out, config(a), progress=True)
    whole = time.perf_counter() - t0
    lines = [json.loads(l) for l in (Path(out)/'metrics.jsonl').read_text().splitlines()]
    per = [a.batch_size / l['samples_per_s'] for l in lines if l['event'] == 'train']
    return dict(step_s=statistics.median(per[2:]), whole_s=whole, steps=s['steps'])


def child(a):
    import torch
    out = Path(tempfile.mkdtemp(prefix='rwid-bench-train-'))
    try:
        res = (run_bare if a.child == 'bare' else run_trainer)(a, out/'run')
    finally: shutil.rmtree(out, ignore_errors=True)
    res.update(rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, threads=torch.get_num_threads())
    print('RESULT ' + json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=12, help='timed steps (after 2 warm-up steps)')
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--size', type=int, default=160, help='image side')
    ap.add_argument('--mode', default='full', help='fine-tuning mode (full, lora, heads, ...)')
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--shards', type=Path, default=None, help='shards folder to build once and reuse')
    ap.add_argument('--child', choices=('bare', 'trainer'), default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child: return child(a)
    tmp = None
    if a.shards is None: tmp = Path(tempfile.mkdtemp(prefix='rwid-bench-train-')); a.shards = tmp/'shards'
    try:
        t0 = time.perf_counter(); build_shards(a.shards); built = time.perf_counter() - t0
        env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', WANDB_SILENT='true', TOKENIZERS_PARALLELISM='false')
        res = {'bare': [], 'trainer': []}
        for r in range(a.repeats):
            for who in ('bare', 'trainer'):
                cmd = [sys.executable, __file__, '--child', who, '--shards', str(a.shards), '--steps', str(a.steps),
                       '--batch-size', str(a.batch_size), '--size', str(a.size), '--mode', a.mode]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
                if p.returncode or not line: print(p.stderr[-3000:], file=sys.stderr); return 1
                res[who].append(json.loads(line[-1][7:]))
    finally:
        if tmp is not None: shutil.rmtree(tmp, ignore_errors=True)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ('step_s', 'whole_s', 'rss_mib')} for w, rs in res.items()}
    steps = res['bare'][0]['steps']
    print(f"Machine: {os.cpu_count()} CPU cores, torch {__import__('torch').__version__} on {res['bare'][0]['threads']} threads; "
          f"shards built in {built:.0f} s; EfficientNet-Lite0 + MiniLM-L6, mode {a.mode}, batch {a.batch_size}, "
          f"{a.size}x{a.size}, fp32; {a.repeats} alternating repeats, medians.\n")
    print("| contender | step (s) | samples/s | ratio | whole run (s) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    bare = a.batch_size / med['bare']['step_s']
    for w in ('bare', 'trainer'):
        sps = a.batch_size / med[w]['step_s']
        print(f"| {w} | {med[w]['step_s']:.3f} | {sps:.1f} | {sps / bare:.2f} | {med[w]['whole_s']:.1f} | {med[w]['rss_mib']:.0f} |")
    ratio = med['bare']['step_s'] / med['trainer']['step_s']
    whole = med['bare']['whole_s'] / med['trainer']['whole_s']
    print(f"\nTarget: trainer >= 0.9 of the bare loop's samples/s. Steady steps: {ratio:.2f} "
          f"({'met' if ratio >= 0.9 else 'NOT met'}); whole runs of {steps} steps incl. start-up and the trainer's "
          f"checkpoint: {whole:.2f}.")


if __name__ == '__main__':
    sys.exit(main())
