"""Dataset converters on synthetic releases written in each publisher's exact layout (tests/conversion_fixtures.py).

Each conversion must pass nnU-Net's own ``verify_dataset_integrity``; bad inputs must raise ``ConversionError``
naming the file and leave nothing in ``nnUNet_raw``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import conversion_fixtures as fx
from conversion_fixtures import nnunet_env, verify  # noqa: F401  (pytest fixture and helper)
from nnunetv2_lgms.dataset_conversion import CONVERTERS, ConversionError, convert, get_module
from nnunetv2_lgms.dataset_conversion import core, io2d

SPLITS = Path(core.__file__).parent / "splits"


def run(name, source, **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("progress", False)
    return convert(name, source, **kw)


def raw_entries(env) -> list:
    """Everything in nnUNet_raw, hidden temporary folders included."""
    return sorted(p.name for p in env["nnUNet_raw"].iterdir())


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------------------------------ every NAME, every layout
EXPECTED = {  # name: (labels, channel_names, default folder name)
    "busi": ({"background": 0, "tumor": 1}, {"0": "US"}, "Dataset501_BUSI"),
    "isic2018": ({"background": 0, "lesion": 1}, {"0": "R", "1": "G", "2": "B"}, "Dataset502_ISIC2018"),
    "kvasir": ({"background": 0, "polyp": 1}, {"0": "R", "1": "G", "2": "B"}, "Dataset503_KvasirSEG"),
    "tnscui": ({"background": 0, "nodule": 1}, {"0": "US"}, "Dataset504_TNSCUI2020"),
    "btcv": (dict(background=0, **{o: i + 1 for i, o in enumerate(get_module("btcv").ORGANS)}), {"0": "CT"},
             "Dataset505_BTCV"),
    "kits23": ({"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}, {"0": "CT"},
               "Dataset506_KiTS2023"),
    "cvc-clinicdb": ({"background": 0, "polyp": 1}, {"0": "R", "1": "G", "2": "B"}, "Dataset511_CVCClinicDB"),
    "cvc-300": ({"background": 0, "polyp": 1}, {"0": "R", "1": "G", "2": "B"}, "Dataset512_CVC300"),
    "ph2": ({"background": 0, "lesion": 1}, {"0": "R", "1": "G", "2": "B"}, "Dataset513_PH2"),
    "bus": ({"background": 0, "tumor": 1}, {"0": "US"}, "Dataset514_BUS_B"),
    "folder": ({"background": 0, "foreground": 1}, {"0": "R", "1": "G", "2": "B"}, "Dataset520_src"),
}


def test_every_name_has_a_fixture_and_expectation():
    assert set(CONVERTERS) == set(fx.BUILDERS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_release_layout_converts_and_passes_nnunet_verification(name, nnunet_env, tmp_path):
    src_root = tmp_path / "src"
    source, n_cases = fx.BUILDERS[name](src_root)
    opts = {"images": "img", "masks": "gt", "mask_suffix": "_mask"} if name == "folder" else {}
    res = run(name, source, **opts)
    labels, channels, folder_name = EXPECTED[name]
    assert res.path == nnunet_env["nnUNet_raw"] / folder_name
    assert res.num_training == n_cases
    dj = json.loads((res.path / "dataset.json").read_text())
    assert dj["labels"] == labels
    assert dj["channel_names"] == channels
    assert dj["numTraining"] == n_cases
    assert dj["file_ending"] == (".nii.gz" if name in ("btcv", "kits23") else ".png")
    verify(res.path)
    assert raw_entries(nnunet_env) == [folder_name]  # no temporary folder left
    if dj["file_ending"] == ".png":
        for f in (res.path / "imagesTr").iterdir():
            arr = png(f)
            assert f.name.endswith("_0000.png")
            assert (arr.ndim == 3 and arr.shape[-1] == 3) if len(channels) == 3 else arr.ndim == 2
        for f in (res.path / "labelsTr").iterdir():
            assert set(np.unique(png(f))) <= {0, 1}


def test_zero_shot_targets_match_their_source_datasets():
    for target, source in (("cvc-clinicdb", "kvasir"), ("cvc-300", "kvasir"), ("ph2", "isic2018"), ("bus", "busi")):
        t, s = get_module(target).SPEC, get_module(source).SPEC
        assert t.zero_shot_source == source
        assert t.labels == s.labels and t.channel_names() == s.channel_names() and t.file_ending == s.file_ending


# ---------------------------------------------------------------------------------------------------- 2D quirks
def test_binarize_handles_every_mask_encoding():
    m = fx._blob(20, 30, 1)
    for mode in ("1", "L", "RGB", "RGBA"):
        assert np.array_equal(io2d.binarize(np.asarray(fx.mask_as(m, mode))), m), mode
    assert np.array_equal(io2d.binarize(m.astype(np.uint8)), m)  # 0/1
    noisy = np.where(m, 255, 0).astype(np.int16) + np.random.default_rng(0).integers(-8, 9, m.shape)
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)  # JPEG-like noise: 0-8 and 247-255
    assert np.array_equal(io2d.binarize(np.stack([noisy] * 3, -1), lossy=True), m)
    assert not io2d.binarize(np.full((4, 4), 6, np.uint8), lossy=True).any()  # empty JPEG mask with noise
    with pytest.raises(ValueError, match="label map"):
        io2d.binarize(np.array([[0, 1], [2, 2]], np.uint8))


def test_jpeg_noise_masks_and_jpeg_images_from_kvasir(nnunet_env, tmp_path):
    source = fx.kvasir(tmp_path / "src", n=2)
    masks = sorted((source / "masks").iterdir())
    raw = np.asarray(Image.open(masks[0]))
    assert raw.ndim == 3 and len(np.unique(raw)) > 2  # the fixture really has JPEG noise
    res = run("kvasir", source)
    img = sorted((source / "images").iterdir())[0]
    out = res.path / "imagesTr" / f"{img.stem}_0000.png"
    assert np.array_equal(png(out), np.asarray(Image.open(img).convert("RGB")))  # lossless re-encode
    assert np.array_equal(png(res.path / "labelsTr" / f"{img.stem}.png"), (raw.max(-1) > 127).astype(np.uint8))


def test_minisblack_three_sample_tiff_is_read_as_rgb(tmp_path):
    rgb = fx._rgb(12, 16, 3)
    path = fx.minisblack_rgb_tiff(tmp_path / "1.tif", rgb)
    with pytest.raises(Exception):
        Image.open(path).load()  # PIL refuses these files, as with the real CVC-ClinicDB
    assert np.array_equal(io2d.read_image(path), rgb)
    assert io2d.image_size(path) == (12, 16)


def test_busi_multi_masks_are_ored_names_sanitised_and_grey_kept(nnunet_env, tmp_path):
    source, unions = fx.busi(tmp_path / "src")
    res = run("busi", source, include_normal=True)
    assert res.num_training == 7
    ids = sorted(f.name[:-4] for f in (res.path / "labelsTr").iterdir())
    assert ids == ["benign_1", "benign_2", "benign_3", "malignant_1", "malignant_2", "normal_1", "normal_2"]
    for cid, union in unions.items():
        assert np.array_equal(png(res.path / "labelsTr" / f"{cid}.png"), union.astype(np.uint8)), cid
    grey = np.asarray(Image.open(source / "benign" / "benign (2).png"))[..., 0]
    assert np.array_equal(png(res.path / "imagesTr" / "benign_2_0000.png"), grey)
    assert not png(res.path / "labelsTr" / "normal_1.png").any()
    info = json.loads((res.path / "conversion_info.json").read_text())
    assert len(info["cases"]["benign_3"]["masks"]) == 3


def test_ph2_ignores_roi_and_reads_rgb_lesion_mask(nnunet_env, tmp_path):
    source = fx.ph2(tmp_path / "src")
    res = run("ph2", source)
    lesion = np.asarray(Image.open(source / "PH2 Dataset images" / "IMD003" / "IMD003_lesion" / "IMD003_lesion.bmp"))
    assert lesion.ndim == 3  # the RGB one
    assert np.array_equal(png(res.path / "labelsTr" / "IMD003.png"), (lesion.max(-1) > 0).astype(np.uint8))


def test_isic_validation_goes_to_imagests(nnunet_env, tmp_path):
    res = run("isic2018", fx.isic2018(tmp_path / "src", n_train=3, n_val=2))
    assert (res.num_training, res.num_test) == (3, 2)
    assert len(list((res.path / "imagesTs").iterdir())) == 2 and len(list((res.path / "labelsTs").iterdir())) == 2


def test_resize_protocol(nnunet_env, tmp_path):
    res = run("cvc-clinicdb", fx.cvc_clinicdb(tmp_path / "src"), resize=32)
    assert res.path.name == "Dataset561_CVCClinicDB_32px"
    for f in (res.path / "imagesTr").iterdir():
        assert png(f).shape == (32, 32, 3)
    for f in (res.path / "labelsTr").iterdir():
        arr = png(f)
        assert arr.shape == (32, 32) and set(np.unique(arr)) == {0, 1}
    verify(res.path)
    with pytest.raises(ConversionError, match="2D datasets only"):
        run("btcv", fx.btcv(tmp_path / "b"), resize=32)


def test_folder_multi_label_and_grey(nnunet_env, tmp_path):
    for i in range(3):
        fx.save(fx._grey(20, 24, i), tmp_path / "src" / "images" / f"c{i}.png")
        lab = np.zeros((20, 24), np.uint8)
        lab[2:8, 2:8] = 50
        lab[10:14, 10:20] = 200 if i else 0
        fx.save(lab, tmp_path / "src" / "masks" / f"c{i}.png")
    res = run("folder", tmp_path / "src", multi_label=True, title="Organs", dataset_id=600)
    assert res.path.name == "Dataset600_Organs"
    dj = json.loads((res.path / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "label_50": 1, "label_200": 2}
    assert dj["channel_names"] == {"0": "grey"}
    assert set(np.unique(png(res.path / "labelsTr" / "c1.png"))) == {0, 1, 2}
    verify(res.path)


def test_parallel_workers(nnunet_env, tmp_path):
    res = run("tnscui", fx.tnscui(tmp_path / "src", n=6), num_workers=2)
    assert res.num_training == 6 and sorted(f.name for f in (res.path / "labelsTr").iterdir())[0] == "tnscui_1.png"
    verify(res.path)


# ---------------------------------------------------------------------------------------------------------------- 3D
def test_btcv_keeps_geometry_and_writes_uint8_labels(nnunet_env, tmp_path):
    import SimpleITK as sitk

    source = fx.btcv(tmp_path / "src", train=(1, 2), test=(61,), label_dtype=np.float32)
    res = run("btcv", source)
    assert (res.num_training, res.num_test) == (2, 1)
    for i in (1, 2):
        src_img = sitk.ReadImage(str(source / "Training" / "img" / f"img{i:04d}.nii.gz"))
        outputs = (res.path / "imagesTr" / f"btcv_{i:04d}_0000.nii.gz", res.path / "labelsTr" / f"btcv_{i:04d}.nii.gz")
        for out in outputs:
            o = sitk.ReadImage(str(out))
            assert np.allclose(o.GetSpacing(), (0.7, 0.7, 3.0))
            assert np.allclose(o.GetOrigin(), src_img.GetOrigin())
            assert np.allclose(o.GetDirection(), src_img.GetDirection())
        assert sitk.ReadImage(str(res.path / "imagesTr" / f"btcv_{i:04d}_0000.nii.gz")).GetPixelID() == sitk.sitkInt16
        lab = sitk.ReadImage(str(res.path / "labelsTr" / f"btcv_{i:04d}.nii.gz"))
        assert lab.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(lab))) == set(range(14))
    assert not np.allclose(sitk.ReadImage(str(res.path / "imagesTr" / "btcv_0001_0000.nii.gz")).GetDirection(),
                           np.eye(3).ravel())  # the non-identity case survived
    assert (res.path / "imagesTs" / "btcv_0061_0000.nii.gz").exists()


def test_btcv_paper_split_24_6(nnunet_env, tmp_path):
    ids = list(range(1, 11)) + list(range(21, 41))
    res = run("btcv", fx.btcv(tmp_path / "src", train=ids, test=(), shape=(2, 3, 3)), paper_splits=True)
    splits = json.loads(res.splits_file.read_text())
    assert res.splits_file == nnunet_env["nnUNet_preprocessed"] / "Dataset505_BTCV" / "splits_final.json"
    assert len(splits) == 1 and len(splits[0]["train"]) == 24
    assert splits[0]["val"] == [f"btcv_{i:04d}" for i in range(35, 41)]


def test_kits23_regions_like_nnunet_dataset220(nnunet_env, tmp_path):
    source = fx.kits23(tmp_path / "src")
    res = run("kits23", source)
    dj = json.loads((res.path / "dataset.json").read_text())
    assert dj["regions_class_order"] == [1, 3, 2]
    assert dj["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    assert list(dj["labels"]) == ["background", "kidney", "masses", "tumor"]  # order matters for regions
    src = (source / "dataset" / "case_00001" / "imaging.nii.gz").read_bytes()
    assert (res.path / "imagesTr" / "case_00001_0000.nii.gz").read_bytes() == src


# ---------------------------------------------------------------------------------------------------- bad inputs
def _make_bad(kind: str, root: Path) -> Path:
    """A Kvasir-SEG release with one defect; returns the source folder."""
    src = fx.kvasir(root, n=3)
    images, masks = sorted((src / "images").iterdir()), sorted((src / "masks").iterdir())
    if kind == "size mismatch":
        fx.mask_as(np.zeros((10, 10), bool), "RGB").save(masks[1], format="JPEG")
    elif kind == "missing mask":
        masks[1].unlink()
    elif kind == "mask without image":
        images[1].unlink()
    elif kind == "unreadable header":
        images[1].write_bytes(b"this is not an image")
    elif kind == "truncated file":
        data = images[1].read_bytes()
        images[1].write_bytes(data[: len(data) // 2])
    elif kind == "duplicate case name":
        fx.save(fx._rgb(52, 60, 0), images[0].with_suffix(".png"))
    elif kind == "empty source":
        for f in images + masks:
            f.unlink()
    return src


BAD = {  # kind: (text expected in the message, file index named in it or None)
    "size mismatch": ("size mismatch", 1),
    "missing mask": ("missing mask", 1),
    "mask without image": ("mask without image", 1),
    "unreadable header": ("unreadable image", 1),
    "truncated file": ("unreadable image", 1),
    "duplicate case name": ("duplicate case name", 0),
    "empty source": ("no cases found", None),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_raises_naming_the_file_and_writes_nothing(kind, nnunet_env, tmp_path):
    src = _make_bad(kind, tmp_path / "src")
    text, idx = BAD[kind]
    with pytest.raises(ConversionError) as err:
        run("kvasir", src)
    msg = str(err.value)
    assert text in msg
    if idx is not None:
        stem = sorted({p.stem for p in (src / "images").iterdir()} | {p.stem for p in (src / "masks").iterdir()})[idx]
        assert stem in msg
    assert raw_entries(nnunet_env) == []
    if kind not in ("empty source", "duplicate case name"):
        res = run("kvasir", src, skip_bad=True)
        assert res.num_training == 2 and len(res.skipped) == 1 and text in res.skipped[0]
        assert len(list((res.path / "imagesTr").iterdir())) == len(list((res.path / "labelsTr").iterdir())) == 2
        verify(res.path)
        assert raw_entries(nnunet_env) == ["Dataset503_KvasirSEG"]


def test_missing_layout_folder_names_the_fix(nnunet_env, tmp_path):
    import shutil

    src = fx.kvasir(tmp_path / "k", n=1)
    shutil.rmtree(src / "masks")
    with pytest.raises(ConversionError, match=r"Kvasir-SEG/masks not found: pass the Kvasir-SEG folder"):
        run("kvasir", src)
    with pytest.raises(ConversionError, match="does not exist"):
        run("busi", tmp_path / "nope")
    assert raw_entries(nnunet_env) == []


def test_existing_dataset_needs_overwrite_and_ids_must_be_unique(nnunet_env, tmp_path):
    src = fx.cvc_300(tmp_path / "src", n=2)
    first = run("cvc-300", src)
    marker = first.path / "imagesTr" / "marker.txt"
    marker.write_text("old")
    with pytest.raises(ConversionError, match="--overwrite"):
        run("cvc-300", src)
    assert marker.exists()
    again = run("cvc-300", src, overwrite=True)
    assert again.path == first.path and not marker.exists()
    verify(again.path)
    with pytest.raises(ConversionError, match="already used by"):
        run("bus", fx.bus(tmp_path / "b"), dataset_id=512)
    assert raw_entries(nnunet_env) == ["Dataset512_CVC300"]


def test_nnunet_raw_must_be_set(monkeypatch, tmp_path):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ConversionError, match="nnUNet_raw is not set"):
        run("cvc-300", fx.cvc_300(tmp_path, n=1))


# ---------------------------------------------------------------------------------------------------- paper splits
def _names(prefix):
    return {k: [l.strip() for l in (SPLITS / f"{prefix}_{k}.txt").read_text().splitlines() if l.strip()]
            for k in ("train1", "train2", "train3", "val1", "val2", "val3")}


def test_packaged_split_lists_match_the_spec():
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "specs" / "splits"
    assert len(list(SPLITS.glob("*.txt"))) == 18
    if shared.is_dir():
        for f in shared.glob("*.txt"):
            assert (SPLITS / f.name).read_bytes() == f.read_bytes()
    for prefix, (n_train, n_val) in (("busi", (452, 195)), ("isic18", (1815, 779)), ("tuscui", (2550, 1094))):
        n = _names(prefix)
        for k in "123":
            assert (len(n[f"train{k}"]), len(n[f"val{k}"])) == (n_train, n_val)
            assert not set(n[f"train{k}"]) & set(n[f"val{k}"])


@pytest.mark.parametrize("name,prefix", [("isic2018", "isic18"), ("tnscui", "tuscui")])
def test_paper_split_lists_map_to_case_ids(name, prefix):
    module = get_module(name)
    n = _names(prefix)
    ids = {module.split_case_id(x) for x in n["train1"] + n["val1"]}
    splits = core.paper_splits_from_lists(prefix, sorted(ids), module.split_case_id)
    assert [len(s["train"]) for s in splits] == [len(n["train1"])] * 3
    assert all(set(s["train"]) | set(s["val"]) == ids for s in splits)
    with pytest.raises(ConversionError, match="not in the converted data"):
        core.paper_splits_from_lists(prefix, sorted(ids)[1:], module.split_case_id)


def test_busi_paper_splits_end_to_end(nnunet_env, tmp_path):
    n = _names("busi")
    source = fx.busi_paper_names(tmp_path / "src", n["train1"] + n["val1"])
    res = run("busi", source, paper_splits=True, resize=16)
    assert res.path.name == "Dataset551_BUSI_16px" and res.num_training == 647
    expected = nnunet_env["nnUNet_preprocessed"] / "Dataset551_BUSI_16px" / "splits_final.json"
    assert res.splits_file == expected
    splits = json.loads(expected.read_text())
    assert [(len(s["train"]), len(s["val"])) for s in splits] == [(452, 195)] * 3
    assert "benign_346" in splits[1]["train"]  # 'benign (346)' -> benign_346
    assert json.loads((res.path / "splits_final.json").read_text()) == splits
    cases = {f.name[:-len("_0000.png")] for f in (res.path / "imagesTr").iterdir()}
    assert all(set(s["train"]) | set(s["val"]) <= cases for s in splits)


def test_paper_splits_fail_before_writing_when_cases_are_missing(nnunet_env, tmp_path):
    source, _ = fx.busi(tmp_path / "src")
    with pytest.raises(ConversionError, match="not in the converted data"):
        run("busi", source, paper_splits=True)
    with pytest.raises(ConversionError, match="no split"):
        run("kvasir", fx.kvasir(tmp_path / "k", n=1), paper_splits=True)
    assert raw_entries(nnunet_env) == []


# ------------------------------------------------------------------------------------------------------------- CLI
def test_cli_convert(nnunet_env, tmp_path, capsys):
    from nnunetv2_lgms.cli import main
    from nnunetv2_lgms.commands.convert import dataset_names

    assert dataset_names() == list(CONVERTERS)
    src = fx.bus(tmp_path / "src")
    assert main(["convert", "bus", str(src), "-np", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(nnunet_env["nnUNet_raw"] / "Dataset514_BUS_B") in out and "3 training case(s)" in out
    assert main(["convert", "bus", str(src), "-np", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--overwrite" in err and "Traceback" not in err
    assert main(["convert", "kvasir", str(src), "--include-normal"]) == 2
    assert "only applies to 'busi'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- registry: converters' SPECs
def _help_text(capsys) -> str:
    from nnunetv2_lgms.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # line wrapping does not matter


def test_every_module_declaring_a_spec_is_registered():
    from nnunetv2_lgms import dataset_conversion as dc

    declared = {p.stem for p in Path(dc.__file__).parent.glob("*.py") if "\nSPEC = " in p.read_text()}
    assert declared and set(CONVERTERS.values()) == declared
    assert {key: get_module(key).SPEC.key for key in CONVERTERS} == {key: key for key in CONVERTERS}
    ids = [spec.default_id for spec in dc.specs().values()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # listed by default ID, no two the same


def test_command_names_and_epilog_come_from_the_specs(capsys):
    from nnunetv2_lgms.commands import convert as cmd
    from nnunetv2_lgms.dataset_conversion import specs

    assert cmd.dataset_names() == list(specs())
    text = _help_text(capsys)
    for key, spec in specs().items():
        assert f"{key} {spec.default_id}" in text, key
    assert "--paper-splits (busi, isic2018, tnscui, btcv) writes" in text
    assert "dataset: " + ", ".join(specs()) in text


_EXTRA_CONVERTER = '''
from .core import DatasetSpec, find_folder_pair, sanitize_case_id

SPEC = DatasetSpec(key="{key}", title="MyData", default_id={default_id}, dim=2, channels="rgb",
                   labels={{"background": 0, "thing": 1}}, layout_hint="images/*.png and masks/*.png")


def find_cases(source, options):
    return find_folder_pair(source, "images", "masks", [], "the MyData folder", sanitize_case_id)
'''


@pytest.fixture
def extra_converter(tmp_path, monkeypatch):
    """Writes converter modules into an extra folder of the package's search path (a stand-in for adding a file to
    dataset_conversion/) and resets the registry; undone afterwards."""
    import importlib
    import sys

    from nnunetv2_lgms import dataset_conversion as dc

    folder = tmp_path / "extra_converters"
    folder.mkdir()
    monkeypatch.setattr(dc, "__path__", list(dc.__path__) + [str(folder)])
    monkeypatch.setattr(dc, "_registry", {})
    added = []

    def add(module_name: str, key: str, default_id: int) -> None:
        (folder / f"{module_name}.py").write_text(_EXTRA_CONVERTER.format(key=key, default_id=default_id))
        importlib.invalidate_caches()
        added.append(f"{dc.__name__}.{module_name}")

    yield add
    for name in added:
        sys.modules.pop(name, None)


def test_a_new_module_with_a_spec_is_enough_for_the_command(extra_converter, nnunet_env, tmp_path, capsys):
    from nnunetv2_lgms.cli import main

    from nnunetv2_lgms.dataset_conversion import converters

    extra_converter("zz_mydata", "mydata", 777)
    assert list(converters())[-1] == "mydata"  # after folder (520): default-ID order
    text = _help_text(capsys)
    assert "mydata 777" in text and "folder 520, mydata 777." in text
    src = fx.cvc_300(tmp_path / "src", n=2) / "CVC-300"  # images/ + masks/, as MyData expects
    assert main(["convert", "mydata", str(src), "-np", "1", "--no-progress"]) == 0
    assert str(nnunet_env["nnUNet_raw"] / "Dataset777_MyData") in capsys.readouterr().out
    verify(nnunet_env["nnUNet_raw"] / "Dataset777_MyData")


def test_two_modules_with_one_name_are_refused(extra_converter):
    extra_converter("zz_other_kvasir", "kvasir", 790)
    with pytest.raises(ConversionError, match=r"dataset name 'kvasir': kvasir\.py and zz_other_kvasir\.py"):
        get_module("kvasir")


# ---------------------------------------------------------------------------------------- the steps of convert()
def tree(root: Path) -> list:
    """Every path under root (hidden ones included) with its size: a snapshot to prove nothing was written."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def _used_id(env, tmp_path, monkeypatch):
    (env["nnUNet_results"] / "Dataset503_Other").mkdir(parents=True)


def _existing_target(env, tmp_path, monkeypatch):
    (env["nnUNet_raw"] / "Dataset503_KvasirSEG").mkdir()


def _raw_unset(env, tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw")


def _file_as_source(env, tmp_path, monkeypatch):
    return next((tmp_path / "src" / "Kvasir-SEG" / "images").iterdir())


def _missing_source(env, tmp_path, monkeypatch):
    return tmp_path / "nope"


VALIDATE_ERRORS = {  # case: (converter, setup (may return the source to pass) or None, keyword arguments, message)
    "missing source": ("kvasir", _missing_source, {}, "source folder .*nope does not exist"),
    "source is a file": ("kvasir", _file_as_source, {}, r"\.jpg is not a folder: pass the extracted release folder"),
    "resize on 3D": ("btcv", None, {"resize": 32}, "--resize applies to 2D datasets only; btcv is 3D"),
    "resize too small": ("kvasir", None, {"resize": 4}, "--resize 4: expected a side length between 8 and 8192"),
    "no paper splits": ("kvasir", None, {"paper_splits": True},
                        r"no split for kvasir \(available for busi, isic2018, tnscui and btcv\)"),
    "ID out of range": ("kvasir", None, {"dataset_id": 1000}, "dataset ID 1000 is outside 1..999"),
    "bad name": ("folder", None, {"options": {"title": "my data"}}, "dataset name 'my data' may contain only"),
    "ID used elsewhere": ("kvasir", _used_id, {},
                          "dataset ID 503 is already used by .*nnUNet_results/Dataset503_Other"),
    "target exists": ("kvasir", _existing_target, {}, "Dataset503_KvasirSEG already exists; pass --overwrite"),
    "nnUNet_raw unset": ("kvasir", _raw_unset, {}, "nnUNet_raw is not set: export nnUNet_raw="),
}


@pytest.mark.parametrize("kind", sorted(VALIDATE_ERRORS))
def test_validate_rejects_bad_input_before_reading_cases_or_writing(kind, nnunet_env, tmp_path, monkeypatch):
    import types

    name, setup, kwargs, message = VALIDATE_ERRORS[kind]
    fx.kvasir(tmp_path / "src", n=1)
    source = (setup(nnunet_env, tmp_path, monkeypatch) if setup else None) or tmp_path / "src"
    real = get_module(name)

    def never(*_args):
        raise AssertionError("validate() must not read the release")

    module = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    module.find_cases = module.check_case = module.prepare = never
    before = tree(tmp_path)
    with pytest.raises(ConversionError, match=message):
        core.validate(module, source, **kwargs)
    assert tree(tmp_path) == before


def test_validate_names_the_dataset_and_creates_nothing(nnunet_env, tmp_path):
    src = fx.kvasir(tmp_path / "src", n=1)
    new_raw = tmp_path / "new_raw"
    request = core.validate(get_module("kvasir"), src, resize=32, raw_dir=new_raw)
    assert (request.dataset_id, request.name) == (553, "Dataset553_KvasirSEG_32px")
    assert request.target == new_raw / "Dataset553_KvasirSEG_32px"
    assert request.pre == nnunet_env["nnUNet_preprocessed"]
    assert not new_raw.exists()  # only write() creates nnUNet_raw
    request = core.validate(get_module("folder"), src, dataset_id=7, options={"title": "Mine"})
    assert (request.name, request.target.parent) == ("Dataset007_Mine", nnunet_env["nnUNet_raw"])


def test_nnunet_folders_are_read_through_nnunetv2_paths(monkeypatch, tmp_path):
    from nnunetv2 import paths

    # nnU-Net's own lookup decides: point its nnUNet_raw object at another variable and unset the usual one
    monkeypatch.setattr(paths, "nnUNet_raw", paths._EnvPath("LGMS_TEST_RAW", "test"))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.setenv("LGMS_TEST_RAW", str(tmp_path / "raw"))  # set after import: read at call time
    assert core.nnunet_dir("nnUNet_raw") == tmp_path / "raw"
    assert core.nnunet_dir("nnUNet_raw", tmp_path / "x") == tmp_path / "x"  # an explicit folder wins
    monkeypatch.setenv("LGMS_TEST_RAW", "")
    assert core.nnunet_dir("nnUNet_raw") is None  # empty counts as unset
    monkeypatch.delenv("LGMS_TEST_RAW")
    assert core.nnunet_dir("nnUNet_raw") is None
    with pytest.raises(ConversionError, match="nnUNet_raw is not set"):
        core.validate(get_module("cvc-300"), fx.cvc_300(tmp_path / "src", n=1))


def _kvasir_with_defects(root: Path):
    """Kvasir-SEG, 4 cases: #0 duplicated as .png, #1 without mask, #2 with an undecodable image; #3 is good."""
    src = fx.kvasir(root, n=4)
    images, masks = sorted((src / "images").iterdir()), sorted((src / "masks").iterdir())
    fx.save(fx._rgb(52, 60, 0), images[0].with_suffix(".png"))
    masks[1].unlink()
    images[2].write_bytes(b"not an image")
    return src, [p.stem for p in images]


def test_discover_reads_the_layout_only(nnunet_env, tmp_path):
    src, stems = _kvasir_with_defects(tmp_path / "src")
    request = core.validate(get_module("kvasir"), src)
    before = tree(tmp_path)
    found = core.discover(request)
    assert [c.case_id for c in found.cases] == [stems[0], stems[0], stems[1], stems[2], stems[3]]
    messages = [p.message for p in found.problems]
    assert len(messages) == 2  # the undecodable image is not opened here
    assert any("duplicate case name" in m and stems[0] in m for m in messages)
    assert any("missing mask" in m and stems[1] in m for m in messages)
    assert [c.case_id for c in core.discover(request, limit=3).cases] == [stems[0], stems[0], stems[1]]
    assert len(core.discover(request, limit=1).problems) == 1  # problems of cases beyond the limit are dropped
    for f in (src / "images").iterdir():
        f.unlink()
    with pytest.raises(ConversionError, match=r"no cases found in .*Kvasir-SEG/images/\*\.jpg"):
        core.discover(request)
    assert tree(tmp_path) == [x for x in before if not x[0].startswith("src/Kvasir-SEG/images/")]


def test_check_cases_stops_or_skips_without_writing(nnunet_env, tmp_path):
    import dataclasses

    src, stems = _kvasir_with_defects(tmp_path / "src")
    request = core.validate(get_module("kvasir"), src, resize=16)
    found = core.discover(request)
    before = tree(tmp_path)
    with pytest.raises(ConversionError) as err:
        core.check_cases(request, found)
    msg = str(err.value)
    assert msg.startswith(f"3 problem(s) in {src}; nothing was written:") and "--skip-bad" in msg
    assert f"unreadable image {src / 'images' / stems[2]}.jpg" in msg
    selection = core.check_cases(dataclasses.replace(request, skip_bad=True), found)
    assert [c.case_id for c in selection.cases] == [stems[3]]
    assert len(selection.skipped) == 3
    assert selection.settings == {"channels": "rgb", "resize": 16}
    assert selection.labels == {"background": 0, "polyp": 1}
    assert tree(tmp_path) == before


def test_check_cases_applies_the_modules_prepare(nnunet_env, tmp_path):
    src = fx.folder(tmp_path / "src")
    request = core.validate(get_module("folder"), src, options={"images": "img", "masks": "gt",
                                                                  "mask_suffix": "_mask", "channels": "grey",
                                                                  "label_name": "lesion"})
    selection = core.check_cases(request, core.discover(request))
    assert selection.spec.channels == "grey" and selection.spec.channel_names() == {0: "grey"}
    assert selection.labels == {"background": 0, "lesion": 1} and "labels_override" not in selection.settings


def _btcv_cases(ids):
    return [core.Case(f"btcv_{i:04d}", Path(f"img{i:04d}.nii.gz")) for i in ids]


def test_plan_splits_checks_before_writing(nnunet_env, tmp_path):
    import dataclasses

    src = tmp_path / "src"
    src.mkdir()
    request = core.validate(get_module("btcv"), src, paper_splits=True)
    cases = _btcv_cases(list(range(1, 11)) + list(range(21, 41))) + [core.Case("btcv_0061", Path("t"), subset="Ts")]
    splits = core.plan_splits(request, cases)
    assert len(splits) == 1 and len(splits[0]["train"]) == 24 and "btcv_0061" not in splits[0]["train"]
    assert core.plan_splits(dataclasses.replace(request, paper_splits=False), cases) is None
    with pytest.raises(ConversionError, match="needs the 30 labelled training cases"):
        core.plan_splits(request, cases[1:])
    existing = nnunet_env["nnUNet_preprocessed"] / "Dataset505_BTCV" / "splits_final.json"
    existing.parent.mkdir(parents=True)
    existing.write_text(json.dumps(splits))
    assert core.plan_splits(request, cases) == splits  # the same split again is fine
    existing.write_text(json.dumps([{"train": [], "val": []}]))
    with pytest.raises(ConversionError, match="exists with a different split; pass --overwrite"):
        core.plan_splits(request, cases)
    assert core.plan_splits(dataclasses.replace(request, overwrite=True), cases) == splits
    assert json.loads(existing.read_text()) == [{"train": [], "val": []}]  # only write_splits() writes


def test_write_puts_a_complete_dataset_in_place_or_nothing(nnunet_env, tmp_path):
    import dataclasses

    src = fx.kvasir(tmp_path / "src", n=3)
    images = sorted((src / "images").iterdir())
    module = get_module("kvasir")
    good = core.validate(module, src)
    selection = core.check_cases(good, core.discover(good))
    first = core.write(good, selection, progress=False)
    assert (first.num_training, first.num_test, first.skipped, first.splits) == (3, 0, [], None)
    assert raw_entries(nnunet_env) == ["Dataset503_KvasirSEG"]
    (good.target / "marker.txt").write_text("old")
    # a file that passes the header check but cannot be decoded: the conversion itself fails
    data = images[1].read_bytes()
    images[1].write_bytes(data[: len(data) // 2])
    request = core.validate(module, src, overwrite=True)
    selection = core.check_cases(request, core.discover(request))
    assert len(selection.cases) == 3 and not selection.skipped
    before = tree(nnunet_env["nnUNet_raw"])
    with pytest.raises(ConversionError, match=rf"1 case\(s\) could not be converted; nothing was written:\n.*"
                                              rf"unreadable image .*{images[1].name}"):
        core.write(request, selection, progress=False)
    assert tree(nnunet_env["nnUNet_raw"]) == before  # old dataset untouched, no temporary folder left
    ids = [c.case_id for c in selection.cases]
    written = core.write(dataclasses.replace(request, skip_bad=True), selection,
                         splits=[{"train": ids[:2], "val": ids[2:]}], progress=False)
    assert written.num_training == 2 and len(written.skipped) == 1 and images[1].name in written.skipped[0]
    assert written.splits == [{"train": [ids[0]], "val": [ids[2]]}]
    assert raw_entries(nnunet_env) == ["Dataset503_KvasirSEG"] and not (good.target / "marker.txt").exists()
    assert json.loads((good.target / "splits_final.json").read_text()) == written.splits
    info = json.loads((good.target / "conversion_info.json").read_text())
    assert sorted(info["cases"]) == [ids[0], ids[2]] and info["skipped"] == written.skipped
    verify(good.target)


def test_write_splits_to_nnunet_preprocessed_and_notes(nnunet_env, tmp_path):
    import dataclasses

    src = tmp_path / "src"
    src.mkdir()
    request = core.validate(get_module("btcv"), src, paper_splits=True)
    splits = [{"train": ["btcv_0001"], "val": ["btcv_0002"]}]
    path, notes = core.write_splits(request, splits)
    assert path == nnunet_env["nnUNet_preprocessed"] / "Dataset505_BTCV" / "splits_final.json"
    assert json.loads(path.read_text()) == splits and notes == []
    _, notes = core.write_splits(dataclasses.replace(request, paper_splits=False), None)
    assert len(notes) == 1 and "already exists from an earlier run" in notes[0]
    (path.parent / "dataset_fingerprint.json").write_text("{}")
    _, notes = core.write_splits(dataclasses.replace(request, overwrite=True), splits)
    assert notes == [f"{path.parent} holds preprocessed data of the previous conversion: rerun "
                     f"nnUNetv2_plan_and_preprocess -d 505"]
    no_pre = dataclasses.replace(request, pre=None)
    assert core.write_splits(no_pre, splits) == (None, [
        f"nnUNet_preprocessed is not set: copy {request.target / 'splits_final.json'} to "
        f"$nnUNet_preprocessed/Dataset505_BTCV/splits_final.json before training"])
