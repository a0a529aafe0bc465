"""The package builds as a wheel and works installed into a fresh venv outside the repository, reading nothing from nbs/."""
import os, sys, subprocess, zipfile, venv, sysconfig
from pathlib import Path

from conftest import ROOT


def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    dist = tmp_path/'dist'
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(dist), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    whl = next(dist.glob('rwid_nb-*.whl'))
    names = zipfile.ZipFile(whl).namelist()
    assert 'rwid_nb/core.py' in names and 'rwid_nb/data/phantom.py' in names and 'rwid_nb/cli.py' in names
    assert not any(n.startswith('nbs/') or n.endswith('.ipynb') for n in names)
    # a fresh venv that gets this wheel; its dependencies come from the workspace venv through a .pth file
    # (re-downloading torch and friends would test pip, not us)
    env_dir = tmp_path/'venv'
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir/'bin'/'python'
    r = subprocess.run([str(py), '-m', 'pip', 'install', '--no-deps', '-q', str(whl)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    site = subprocess.check_output([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], text=True).strip()
    Path(site, 'workspace_deps.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    away = tmp_path/'elsewhere'; away.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith('RWID_') and k != 'PYTHONPATH'}
    r = subprocess.run([str(env_dir/'bin'/'rwid'), '--help'], capture_output=True, text=True, cwd=away, env=env, timeout=300)
    assert r.returncode == 0 and 'phantom' in r.stdout, r.stderr
    code = ("import rwid_nb, rwid_nb.data.phantom as p, pathlib; "
            "assert 'site-packages' in rwid_nb.__file__, rwid_nb.__file__; "
            "p.generate_cohort('c', 2, seed=1, workers=1, progress=False); print(rwid_nb.__version__)")
    r = subprocess.run([str(py), '-c', code], capture_output=True, text=True, cwd=away, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (away/'c'/'ground_truth.csv').is_file()
