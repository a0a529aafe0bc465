"""The real DICOM corpora that install offline from PyPI: pydicom's bundled test files, pydicom-data (`data_store`)
and deid-data. Every file in their data folders is returned, DICOM or not (zips, READMEs, Python files are part of
a real delivery's mess too); callers that want DICOM only filter themselves."""
from pathlib import Path
import importlib.util


def _pkg_dir(name):
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def corpus_dirs() -> dict:
    "name -> data folder of each installed corpus."
    out = {}
    if (p := _pkg_dir('pydicom')) and (p/'data'/'test_files').is_dir(): out['pydicom'] = p/'data'/'test_files'
    if (p := _pkg_dir('data_store')) and (p/'data').is_dir(): out['pydicom-data'] = p/'data'
    if (p := _pkg_dir('deid_data')) and (p/'data').is_dir(): out['deid-data'] = p/'data'
    return out


def corpus_files(exclude_python: bool = True) -> list:
    "Every file of every installed corpus (sorted), without `__pycache__` and, by default, without `.py` files."
    files = []
    for d in corpus_dirs().values():
        for f in sorted(d.rglob('*')):
            if not f.is_file() or '__pycache__' in f.parts: continue
            if exclude_python and f.suffix == '.py': continue
            files.append(f)
    return files
