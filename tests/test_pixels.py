"""`rwid_nb.data.dicom` against independent references.

- Every native (uncompressed) greyscale file of the real corpora that pydicom decodes: `read_instance` equals
  pydicom's own `apply_modality_lut(ds.pixel_array, ds)`, except MONOCHROME1 files, which must come out inverted.
- Every corpus file, DICOM or not: `read_instance` reads it or raises `DecoderMissingError` / `PixelDataError`
  naming the file; nothing else escapes, and whatever pydicom itself can decode, we read.
- Phantom CT series shuffled under random names and renumbered at random assemble into the same volume; a removed
  middle slice is `missing_slices` (and rejected on request), a copied one `duplicate_slices`; the sites whose
  InstanceNumbers run head-first come out with the head at the same end as the others.
- Phantom radiographs: the mediastinum is brighter than the lungs at every site, MONOCHROME1 ones included.
- The file's VOI (VOI LUT sequence, SIGMOID window) applied to `read_instance` pixels equals pydicom's VOI on the
  stored values, mirrored for MONOCHROME1.
"""
import shutil, warnings

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import uid as dcm_uid
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from corpora import corpus_files
from rwid_nb.data.dicom import (read_instance, load_series, file_window, DecoderMissingError, PixelDataError,
                                SeriesGeometryError)

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning:pydicom')  # the corpora are odd on purpose

NATIVE = {dcm_uid.ExplicitVRLittleEndian, dcm_uid.ImplicitVRLittleEndian, dcm_uid.ExplicitVRBigEndian,
          dcm_uid.DeflatedExplicitVRLittleEndian}
GREY = ('MONOCHROME1', 'MONOCHROME2')


def _read(f):
    try: return pydicom.dcmread(f)
    except Exception: return None


def _corpus_id(f):
    return f"{f.parent.name}/{f.name}"


def _native_grey_files():
    "Native-syntax greyscale corpus files whose pixels pydicom itself decodes."
    out = []
    for f in corpus_files():
        ds = _read(f)
        if ds is None or 'PixelData' not in ds: continue
        ts = getattr(ds, 'file_meta', pydicom.Dataset()).get('TransferSyntaxUID')
        if ts not in NATIVE or str(ds.get('PhotometricInterpretation', '')).strip() not in GREY: continue
        try: ds.pixel_array
        except Exception: continue
        out.append(f)
    return out


with warnings.catch_warnings():  # collection time: the mark below does not reach here
    warnings.simplefilter('ignore')
    NATIVE_GREY = _native_grey_files()


def test_corpus_has_what_the_comparison_needs():
    names = {f.name for f in NATIVE_GREY}
    photometrics = {str(pydicom.dcmread(f, stop_before_pixels=True).PhotometricInterpretation) for f in NATIVE_GREY}
    assert len(NATIVE_GREY) >= 40 and photometrics == set(GREY)
    assert {'CT_small.dcm', 'RG1_UNCR.dcm', 'mlut_18.dcm', 'eCT_Supplemental.dcm', 'emri_small_big_endian.dcm'} <= names


def _pydicom_physical(ds):
    """pydicom's `apply_modality_lut`, frame by frame. pydicom reads only the top level, so for an enhanced file the
    frame's Pixel Value Transformation item (per-frame, else shared functional group) is given to it as the dataset."""
    arr = ds.pixel_array
    nf = int(ds.get('NumberOfFrames') or 1)
    frames = arr if nf > 1 else arr[None]
    out = []
    for i, frame in enumerate(frames):
        src = ds
        for groups, k in ((ds.get('PerFrameFunctionalGroupsSequence'), i), (ds.get('SharedFunctionalGroupsSequence'), 0)):
            if groups and k < len(groups) and groups[k].get('PixelValueTransformationSequence'):
                src = groups[k].PixelValueTransformationSequence[0]
                break
        out.append(np.asarray(apply_modality_lut(frame, src), dtype=np.float64))
    out = np.stack(out)
    return out if nf > 1 else out[0]


@pytest.mark.parametrize('f', NATIVE_GREY, ids=_corpus_id)
def test_native_greyscale_equals_pydicom_modality_lut(f):
    ds = pydicom.dcmread(f)
    ref = _pydicom_physical(ds)
    img = read_instance(f)
    assert img.pixels.dtype == np.float32 and img.pixels.shape == ref.shape
    assert img.photometric == 'MONOCHROME2'
    if str(ds.PhotometricInterpretation).strip() == 'MONOCHROME2':
        np.testing.assert_allclose(img.pixels, ref, rtol=1e-6, atol=1e-3)
        return
    # MONOCHROME1: the same values mirrored, so the ordering reverses exactly
    if ref.max() == ref.min(): return
    r = np.corrcoef(img.pixels.ravel().astype(np.float64), ref.ravel())[0, 1]
    assert r < -0.999999, r
    assert ref.flat[int(np.argmax(img.pixels))] == ref.min() and ref.flat[int(np.argmin(img.pixels))] == ref.max()
    lo, hi = img.value_range
    assert lo <= ref.min() and ref.max() <= hi  # mirrored within the physical range, not out of it


ALL_FILES = corpus_files()


@pytest.mark.parametrize('f', ALL_FILES, ids=_corpus_id)
def test_every_corpus_file_reads_or_fails_clearly(f):
    ds = _read(f)
    pydicom_decodes = False
    if ds is not None and 'PixelData' in ds:
        try: ds.pixel_array; pydicom_decodes = True
        except Exception: pass
    try: img = read_instance(f)
    except (DecoderMissingError, PixelDataError) as e:
        assert f.name in str(e), str(e)
        assert not pydicom_decodes, f"pydicom decodes {f.name} but read_instance raised {e!r}"
        return
    assert ds is not None and 'PixelData' in ds
    assert img.pixels.dtype == np.float32
    assert img.photometric in ('MONOCHROME2', 'RGB')
    rows, cols = int(ds.Rows), int(ds.Columns)
    spatial = img.pixels.shape[-3:-1] if img.photometric == 'RGB' else img.pixels.shape[-2:]
    assert tuple(spatial) == (rows, cols)
    assert img.spacing_source in ('PixelSpacing', 'ImagerPixelSpacing', 'UltrasoundRegions', 'none')
    assert (img.spacing_mm is None) == (img.spacing_source == 'none')


def test_the_sweep_sees_both_failure_kinds_and_colour():
    "The sweep above is only as good as what it meets: a missing-decoder case, broken files and every colour route."
    kinds, routes = set(), set()
    for f in ALL_FILES:
        try: img = read_instance(f)
        except (DecoderMissingError, PixelDataError) as e: kinds.add(type(e)); continue
        routes.add(img.source_photometric)
    assert PixelDataError in kinds
    assert {'RGB', 'YBR_FULL', 'YBR_FULL_422', 'PALETTE COLOR', 'YBR_ICT', 'YBR_RCT', 'MONOCHROME1'} <= routes
    try: import pylibjpeg_libjpeg  # noqa: F401  -- with it, 12-bit JPEG decodes and nothing is missing
    except ImportError: assert DecoderMissingError in kinds


# ----------------------------------------------------------------------------------------------- phantom series
SITES = ('S01', 'S02', 'S03', 'S04', 'S05', 'S06', 'S07')
HEAD_FIRST_SITES = ('S02', 'S05')  # their InstanceNumbers run against the slice normal (see phantom `reverse_instance`)


@pytest.fixture(scope='module')
def ct_series(tmp_path_factory):
    "site -> sorted file list of one phantom chest CT series per site."
    from rwid_nb.data.phantom import generate_cohort, SITES as PHANTOM_SITES
    assert {s for s in PHANTOM_SITES if PHANTOM_SITES[s].ct['reverse_instance']} == set(HEAD_FIRST_SITES)
    root = tmp_path_factory.mktemp('ct')
    out = {}
    for site in SITES:
        generate_cohort(root/site, n_studies=1, seed=7, workers=1, progress=False, sites=[site], modalities=['CT'])
        gt = pd.read_csv(root/site/'ground_truth.csv')
        out[site] = sorted((root/site/gt.study_dir.iloc[0]/'2').iterdir())
    return out


def _z(f):
    return float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])


def _scramble(files, dest, seed):
    "Copy `files` under random names with random InstanceNumbers."
    rng = np.random.default_rng(seed)
    dest.mkdir()
    for f, k in zip(files, rng.permutation(len(files))):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = int(rng.integers(1, 100_000))
        ds.save_as(dest/f"{rng.integers(1 << 30):09d}_{k}")
    return sorted(dest.iterdir())


@pytest.mark.parametrize('site', ['S06', 'S02'])
def test_shuffled_renumbered_series_is_the_same_volume(ct_series, site, tmp_path):
    ref = load_series(ct_series[site])
    got = load_series(_scramble(ct_series[site], tmp_path/'mess', seed=1))
    assert ref.issues == [] and got.issues == []
    np.testing.assert_array_equal(got.pixels, ref.pixels)
    np.testing.assert_array_equal(got.positions, ref.positions)
    assert got.spacing_mm == ref.spacing_mm
    # and that order is the geometric one, computed here independently: z ascends (axial: the normal is +z)
    z = sorted(_z(f) for f in ct_series[site])
    np.testing.assert_allclose(ref.positions[:, 2], z)


def test_missing_middle_slice_is_flagged_and_rejected(ct_series, tmp_path):
    files = sorted(ct_series['S01'], key=_z)
    holed = files[:len(files)//2] + files[len(files)//2 + 1:]
    vol = load_series(holed)
    assert vol.issues == ['missing_slices'] and len(vol.pixels) == len(files) - 1
    full = load_series(files)
    assert vol.spacing_mm == full.spacing_mm
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with pytest.raises(SeriesGeometryError, match='missing_slices') as e: load_series(holed, on_issue='reject')
    assert uid in str(e.value)
    assert load_series(files, on_issue='reject').issues == []


def test_duplicate_slice_is_flagged_and_kept_once(ct_series, tmp_path):
    files = ct_series['S03']
    d = tmp_path/'dup'; d.mkdir()
    for f in files: shutil.copy(f, d/f.name)
    shutil.copy(files[5], d/'zz_copy_of_a_slice')
    vol = load_series(sorted(d.iterdir()))
    assert vol.issues == ['duplicate_slices']
    ref = load_series(files)
    np.testing.assert_array_equal(vol.pixels, ref.pixels)
    assert [r for _, r in vol.dropped] == ['duplicate_slices']
    with pytest.raises(SeriesGeometryError, match='duplicate_slices'): load_series(sorted(d.iterdir()), on_issue='reject')


def _lung_fraction(px):
    "Share of each slice's pixels that are aerated lung."
    return ((px < -400) & (px > -1000)).reshape(len(px), -1).mean(1)


def test_head_first_sites_come_out_like_the_others(ct_series):
    """Geometry: every volume ascends along +z. Anatomy: the same end (the head end: the last slices, above the
    diaphragm and liver) holds more lung at every site. Sorting by InstanceNumber instead fails both at the
    head-first sites, which shows the check can fail."""
    for site, files in ct_series.items():
        vol = load_series(files)
        assert vol.issues == [], (site, vol.issues)
        np.testing.assert_allclose(vol.normal, [0, 0, 1], atol=1e-6)
        assert (np.diff(vol.positions[:, 2]) > 0).all()
        third = len(vol.pixels)//3
        prof = _lung_fraction(vol.pixels)
        assert prof[-third:].mean() > prof[:third].mean(), site
        by_number = sorted(files, key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
        z = np.array([_z(f) for f in by_number])
        stack = np.stack([read_instance(f).pixels for f in by_number])
        prof_n = _lung_fraction(stack)
        if site in HEAD_FIRST_SITES:
            assert (np.diff(z) < 0).all() and prof_n[-third:].mean() < prof_n[:third].mean(), site
        else:
            assert (np.diff(z) > 0).all()
            np.testing.assert_array_equal(stack, vol.pixels)


def test_oblique_mr_is_sorted_along_its_own_normal(tmp_path):
    "Osaka plans its brain MR 8 degrees oblique: the stack follows the tilted normal, which is no gantry tilt."
    from rwid_nb.data.phantom import generate_cohort
    generate_cohort(tmp_path/'mr', n_studies=1, seed=7, workers=1, progress=False, sites=['S04'], modalities=['MR'])
    d = pd.read_csv(tmp_path/'mr'/'ground_truth.csv').study_dir.iloc[0]
    files = sorted((tmp_path/'mr'/d).rglob('*.dcm'))
    vol = load_series(_scramble(files, tmp_path/'mess', seed=3))
    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    iop = np.array([float(v) for v in head.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    assert vol.issues == [] and len(vol.pixels) == len(files)
    np.testing.assert_allclose(vol.normal, normal / np.linalg.norm(normal), atol=1e-6)
    assert abs(vol.normal[2]) < 0.999  # oblique indeed
    assert vol.spacing_mm[0] == pytest.approx(float(head.SpacingBetweenSlices), rel=1e-3)
    assert (np.diff(vol.positions @ vol.normal) > 0).all()


def test_on_issue_is_checked(ct_series):
    with pytest.raises(ValueError, match='on_issue'): load_series(ct_series['S01'], on_issue='ignore')


# ----------------------------------------------------------------------------------------------- phantom radiographs
@pytest.fixture(scope='module')
def radiographs(tmp_path_factory):
    "(site, photometric as stored, path) of three phantom chest radiographs per site."
    from rwid_nb.data.phantom import generate_cohort
    root = tmp_path_factory.mktemp('cxr')
    out = []
    for site in SITES:
        generate_cohort(root/site, n_studies=3, seed=7, workers=1, progress=False, sites=[site], modalities=['CR', 'DX'])
        for d in pd.read_csv(root/site/'ground_truth.csv').study_dir:
            for f in sorted((root/site/d).rglob('*')):
                if f.is_file():
                    out.append((site, str(pydicom.dcmread(f, stop_before_pixels=True).PhotometricInterpretation), f))
    return out


def _mediastinum_minus_lung(px):
    "Mean of a central strip (mediastinum, spine) minus the mean of the two lung fields, at mid height."
    r, c = px.shape
    band = px[int(.35*r):int(.6*r)].astype(np.float64)
    return band[:, int(.45*c):int(.55*c)].mean() - (band[:, int(.2*c):int(.3*c)].mean() + band[:, int(.7*c):int(.8*c)].mean())/2


def test_monochrome1_radiographs_are_bright_where_dense(radiographs):
    photometrics = {p for _, p, _ in radiographs}
    assert photometrics == {'MONOCHROME1', 'MONOCHROME2'}
    for site, pi, f in radiographs:
        img = read_instance(f)
        assert img.photometric == 'MONOCHROME2'
        assert _mediastinum_minus_lung(img.pixels) > 0, (site, pi)
        raw = pydicom.dcmread(f).pixel_array
        # the stored values of MONOCHROME1 files are the other way round: without inversion this test fails
        assert (_mediastinum_minus_lung(raw) < 0) == (pi == 'MONOCHROME1'), (site, pi)


def test_file_voi_matches_pydicom_on_stored_values(radiographs):
    "The file's own VOI on our pixels shows what pydicom's VOI on the stored values shows (inverted for MONOCHROME1)."
    seen = set()
    for site, pi, f in radiographs:
        ds = pydicom.dcmread(f)
        img = read_instance(f)
        w = file_window(img)
        assert w is not None
        stored = apply_modality_lut(ds.pixel_array, ds)
        if ds.get('VOILUTSequence'):
            top = 2**int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
            ref = apply_voi(np.rint(stored).astype(np.int64), ds) / top
            seen.add('lut')
        else:
            bits = int(ds.BitsStored)
            s, b = float(ds.get('RescaleSlope', 1)), float(ds.get('RescaleIntercept', 0))
            y_min, y_max = b, (2**bits - 1)*s + b
            ref = (apply_windowing(stored, ds) - y_min) / (y_max - y_min)
            seen.add(str(ds.get('VOILUTFunction', 'LINEAR')))
        if pi == 'MONOCHROME1':
            ref = 1 - ref; seen.add(pi)
        np.testing.assert_allclose(w.apply(img.pixels), ref, atol=2e-3, err_msg=f"{site} {pi}")
        assert file_window(f).center == pytest.approx(w.center, nan_ok=True)
    assert {'lut', 'SIGMOID', 'LINEAR', 'MONOCHROME1'} <= seen
