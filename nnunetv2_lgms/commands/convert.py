"""``nnunetv2_lgms convert NAME SOURCE_DIR``: a public dataset release, read as published, to an nnU-Net v2 raw
dataset in ``$nnUNet_raw/DatasetNNN_Name`` (nothing is written unless every case converts; ``--skip-bad`` converts
the rest and lists what it skipped)."""
from __future__ import annotations

import argparse
import os
import textwrap

_PAPER_SPLITS = ("--paper-splits ({names}) writes the LGMSNet paper's splits (3 train/val splits = folds 0-2; btcv: "
                 "the 24/6 split = fold 0) to $nnUNet_preprocessed/DatasetNNN_Name/splits_final.json, where nnU-Net "
                 "reads it when training starts (planning and preprocessing leave it in place). Without it nnU-Net "
                 "makes its own 5-fold split.")
_EXAMPLES = """\
examples:
  nnunetv2_lgms convert kvasir ~/data/Kvasir-SEG
  nnunetv2_lgms convert busi ~/data/Dataset_BUSI_with_GT --resize 256 --paper-splits
  nnunetv2_lgms convert cvc-clinicdb ~/data/CVC-ClinicDB --resize 256    # zero-shot target of a Kvasir model
  nnunetv2_lgms convert folder ~/data/mine --images img --masks gt --name MyData --channels grey
"""


def dataset_names() -> list:
    """The NAME choices: the ``SPEC.key`` of every converter module, in default-ID order (the converters' registry,
    ``nnunetv2_lgms.dataset_conversion.converters``; imported here, not at module import, to keep ``--help`` of
    other commands light)."""
    from nnunetv2_lgms.dataset_conversion import converters

    return list(converters())


def epilog() -> str:
    """``convert --help`` epilog: every converter's default ID and the datasets with paper splits, from the SPECs."""
    from nnunetv2_lgms.dataset_conversion import get_module, has_paper_splits, specs

    all_specs = specs()
    ids = ", ".join(f"{key}\N{NO-BREAK SPACE}{spec.default_id}" for key, spec in all_specs.items())
    paper = ", ".join(key for key in all_specs if has_paper_splits(get_module(key))) or "none"
    paragraphs = [f"default IDs (+50 with --resize): {ids}.", _PAPER_SPLITS.format(names=paper)]
    wrapped = [textwrap.fill(p, width=116, break_on_hyphens=False, break_long_words=False) for p in paragraphs]
    return "\n\n".join(wrapped).replace("\N{NO-BREAK SPACE}", " ") + "\n\n" + _EXAMPLES


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    names = dataset_names()
    parser.epilog = epilog()
    parser.add_argument("name", choices=names, metavar="NAME", help=f"dataset: {', '.join(names)}")
    parser.add_argument("source", metavar="SOURCE_DIR", help="the extracted release folder (or the folder above it)")
    parser.add_argument("--id", dest="dataset_id", type=int, default=None,
                        help="nnU-Net dataset ID (default: per dataset, see below)")
    parser.add_argument("--resize", type=int, default=None, metavar="S",
                        help="2D: resize every image (bilinear) and mask (nearest) to S x S, the paper protocol "
                             "(default: native resolution, nnU-Net's way)")
    parser.add_argument("--paper-splits", action="store_true",
                        help="write the LGMSNet paper's train/val splits as nnU-Net splits_final.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DatasetNNN_Name")
    parser.add_argument("--skip-bad", action="store_true",
                        help="convert the good cases and list the skipped ones instead of stopping at the first "
                             "problem")
    parser.add_argument("-np", dest="num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes (default: min(8, CPU count))")
    parser.add_argument("--verify", action="store_true",
                        help="run nnU-Net's verify_dataset_integrity on the result")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # tests/debugging: first N cases
    b = parser.add_argument_group("busi")
    b.add_argument("--include-normal", action="store_true",
                   help="also convert the 133 'normal' cases (empty masks); the paper leaves them out")
    g = parser.add_argument_group("folder (any image folder + mask folder, matched by file stem)")
    g.add_argument("--images", default="images", help="image folder, relative to SOURCE_DIR (default: images)")
    g.add_argument("--masks", default="masks", help="mask folder, relative to SOURCE_DIR (default: masks)")
    g.add_argument("--mask-suffix", default="", help="suffix of the mask stems, e.g. _mask for a_mask.png")
    g.add_argument("--name", dest="title", default=None,
                   help="dataset name in DatasetNNN_<name> (default: the source folder's name)")
    g.add_argument("--channels", choices=["auto", "rgb", "grey"], default="auto",
                   help="RGB (3 channels) or grey (1 channel); auto: RGB if any image is colour")
    g.add_argument("--multi-label", action="store_true",
                   help="masks are label maps: their distinct values (sorted) become the labels 0..K")
    g.add_argument("--label-name", default="foreground", help="name of label 1 for binary masks")


_SPECIFIC = {"busi": ("include_normal",),
             "folder": ("images", "masks", "mask_suffix", "title", "channels", "multi_label", "label_name")}


def run(args) -> int:
    import sys

    from nnunetv2_lgms.dataset_conversion import ConversionError, convert, get_module

    options = {k: getattr(args, k) for k in _SPECIFIC.get(args.name, ())}
    for name, keys in _SPECIFIC.items():  # options of another dataset are a mistake worth flagging
        if name != args.name:
            defaults = {"images": "images", "masks": "masks", "mask_suffix": "", "channels": "auto",
                        "label_name": "foreground"}
            used = [k for k in keys if getattr(args, k) not in (None, False, defaults.get(k))]
            if used:
                print(f"error: {', '.join('--' + k.replace('_', '-') for k in used)} only applies to "
                      f"'{name}'", file=sys.stderr)
                return 2
    try:
        result = convert(args.name, args.source, dataset_id=args.dataset_id, resize=args.resize,
                         paper_splits=args.paper_splits, overwrite=args.overwrite, num_workers=args.num_workers,
                         skip_bad=args.skip_bad, limit=args.limit, progress=not args.no_progress, **options)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = get_module(args.name).SPEC
    print(f"{result.path}")
    print(f"{result.dataset_name}: {result.num_training} training case(s) in imagesTr"
          + (f", {result.num_test} test case(s) in imagesTs" if result.num_test else ""))
    if result.skipped:
        print(f"skipped {len(result.skipped)}:")
        for msg in result.skipped:
            print(f"  - {msg}")
    if result.splits_file:
        import json

        n = len(json.loads(result.splits_file.read_text()))
        print(f"paper splits ({'fold 0' if n == 1 else 'folds ' + ', '.join(map(str, range(n)))}): "
              f"{result.splits_file}")
    for note in result.notes:
        print(f"note: {note}")
    if args.verify:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

        try:
            verify_dataset_integrity(str(result.path), max(1, args.num_workers))
        except (AssertionError, RuntimeError) as e:
            print(f"error: nnU-Net's verify_dataset_integrity failed: {e}", file=sys.stderr)
            return 1
    config = "2d" if spec.dim == 2 else "3d_fullres"
    if spec.zero_shot_source:
        print(f"zero-shot: nnUNetv2_predict -i {result.path / 'imagesTr'} -o PRED -d <{spec.zero_shot_source} "
              f"dataset ID> -c 2d -tr TRAINER -f 0, then nnUNetv2_evaluate_simple {result.path / 'labelsTr'} PRED "
              f"-l 1")
    else:
        print(f"next: nnUNetv2_plan_and_preprocess -d {result.dataset_id} -c {config} --verify_dataset_integrity")
    return 0
