"""Headless MedIL batch job through the MedILSlicer Logic.

In the Slicer application:
    Slicer --no-main-window --python-script MedILSlicer/Scripts/medil_batch.py -- --input IN --output OUT --spacing 1
With the slicer-core wheel (real MRML, no application):
    python MedILSlicer/Scripts/medil_batch.py --input IN --output OUT [--spacing S [S S] | --like REF] [--model NAME]
        [--task reconstruct|superres] [--method M]

A whole dataset (a BIDS dataset, a folder of scans, or a .csv/.json manifest) is handed to the backend's
``medil batch`` command (Dask workers, a BIDS-derivatives tree in OUT, resumable with --resume, a report):
    Slicer --no-main-window --python-script MedILSlicer/Scripts/medil_batch.py -- --input DATASET --output OUT_DIR --task superres

Exit status 0 on success, 1 with a one-line message for a user mistake or a failed run.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # MedILSlicer/, for MedILSlicerLib


def parse(argv):
    ap = argparse.ArgumentParser(prog="medil_batch", description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--spacing", type=float, nargs="+")
    g.add_argument("--like", metavar="REF")
    ap.add_argument("--orientation", default="input")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modality", default="auto", choices=["auto", "mri", "ct"])
    ap.add_argument("--task", default="reconstruct", choices=["reconstruct", "superres"])
    ap.add_argument("--method", default=None, help="superres: its method (default: the backend's, adapt)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--resume", action="store_true", help="a dataset: skip the scans already done (medil batch --resume)")
    return ap.parse_args(argv)


def is_dataset(path: str) -> bool:
    """A BIDS dataset, a folder of scans or a manifest (a DICOM series folder is one scan)."""
    if os.path.isfile(path):
        return path.lower().endswith((".csv", ".json"))
    if not os.path.isdir(path):
        return False
    files = sorted(f for f in os.listdir(path) if not f.startswith(".") and os.path.isfile(os.path.join(path, f)))
    if files:
        try:
            with open(os.path.join(path, files[0]), "rb") as fh:
                if fh.read(132)[128:132] == b"DICM":
                    return False
        except OSError:
            return False
    return True


def run_dataset(args) -> int:
    """Hand a dataset to the backend's ``medil batch`` (the same command a researcher runs), in the backend's interpreter."""
    import subprocess

    from MedILSlicerLib.deps import BATCH_REQUIREMENTS, backend_env, missing_requirements
    from MedILSlicerLib.logic import MedILLogicCore
    from MedILSlicerLib.tasks import catalog

    for req in missing_requirements(BATCH_REQUIREMENTS):  # only a batch needs Dask: installed when one is started
        print(f"MedIL batch: installing {req} (Dask, which runs the scans in parallel)", flush=True)
        import slicer

        slicer.util.pip_install(f'"{req}"')
    cmd = [MedILLogicCore().python, "-m", "medil_backend", "batch", args.task, args.input, args.output, "--device", args.device]
    cmd += ["--modality", args.modality]
    if args.spacing:
        cmd += ["--spacing", *map(str, args.spacing)]
    if args.like:
        cmd += ["--like", args.like]
    if args.orientation and args.orientation != "input":
        cmd += ["--orientation", args.orientation]
    if args.model and catalog().uses_model(args.task, {"method": args.method}):  # the task spec's model_when
        cmd += ["--model", args.model]
    if args.method and args.task == "superres":
        cmd += ["--method", args.method]
    cmd += ["--overwrite"] if args.overwrite else []
    cmd += ["--resume"] if args.resume else []
    print("medil_batch: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=backend_env())
    try:
        return proc.wait()
    except KeyboardInterrupt:  # stopped: the batch stops as on Ctrl-C (what finished is kept; --resume goes on)
        import signal

        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


def load_node(path, name):
    """Read a volume into a new node: through a storage node, or the backend's reader for formats the wheel lacks."""
    import slicer
    from MedILSlicerLib.mrml_geometry import numpy_to_vtk_matrix

    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    slicer.mrmlScene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    slicer.mrmlScene.AddNode(storage)
    storage.SetFileName(path)
    if path.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")) and storage.ReadData(node):
        return node
    from medil_backend.io import read_volume

    vol = read_volume(path)
    slicer.util.updateVolumeFromArray(node, vol.array.transpose(2, 1, 0).copy())
    node.SetIJKToRASMatrix(numpy_to_vtk_matrix(vol.affine))
    return node


def node_provenance(node, args, argv) -> dict:
    """The provenance record of an output node (the attributes the logic set on it), for the file and its sidecar."""
    import json

    def attr(key, default=None):
        value = node.GetAttribute(f"MedIL.{key}")
        return default if value is None else value

    try:
        parameters = json.loads(attr("parameters", "{}"))
    except ValueError:
        parameters = {}
    from medil_backend import __version__
    from medil_backend.task import ModelRef, Provenance

    # the shape of every sidecar the backend writes (Provenance.record), from what the logic recorded on the node
    provenance = Provenance(
        task=attr("task", "reconstruct"),
        models=[ModelRef(attr("model"), attr("modelSha256"))] if attr("model") else [],
        grid=None,
        device=str(parameters.get("device") or "unknown"),
        precision=str(parameters.get("precision") or "auto"),
        settings={"modality": attr("modality"), "input": os.path.basename(args.input.rstrip("/")), "parameters": parameters},
    )
    return provenance.record(
        version=attr("backendVersion", __version__),
        command="medil_batch.py " + " ".join(argv),
        frontend="MedILSlicer/Scripts/medil_batch.py",
    )


def run(argv) -> int:
    import numpy as np

    try:
        import slicer
    except ImportError:
        print(
            "medil_batch: error: this script needs 3D Slicer (Slicer --python-script ...) or the slicer-core wheel "
            "(pip install slicer-core); or run the same job with the `medil reconstruct` command",
            file=sys.stderr,
        )
        return 1
    from MedILSlicerLib.logic import MedILLogicCore, MedILSlicerError, OutputSpace
    from MedILSlicerLib.mrml_geometry import ijk_to_ras
    from MedILSlicerLib.tasks import catalog

    from medil_backend.errors import MedILError
    from medil_backend.geometry import Volume
    from medil_backend.io import OutputSet

    args = parse(argv)
    if is_dataset(args.input):
        return run_dataset(args)
    if getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()
    try:
        if args.spacing is not None and len(args.spacing) not in (1, 3):
            raise MedILError("--spacing takes one value (isotropic) or three")
        outputs = OutputSet(args.overwrite)  # the output and its JSON sidecar, checked before any work
        outputs.declare(args.output)
        if not os.path.exists(args.input):
            raise MedILError(f"{args.input} does not exist; check the path")
        node = load_node(args.input, "input")
        space = OutputSpace(spacing=args.spacing or "input", orientation=args.orientation)
        if args.like:
            if not os.path.exists(args.like):
                raise MedILError(f"{args.like} does not exist; check the path")
            space = OutputSpace(like=load_node(args.like, "reference"))

        def on_event(ev):
            if "progress" in ev:
                print(f"[{100 * ev['progress']:5.1f}%] {ev.get('message', '')}", file=sys.stderr, flush=True)

        options = {"model": args.model, "device": args.device, "modality": args.modality, "method": args.method}
        names = set(catalog().option_names(args.task)) | {"model"}  # e.g. reconstruct takes no method
        out = MedILLogicCore().process(args.task, node, space, {k: v for k, v in options.items() if k in names}, onEvent=on_event)
        array = slicer.util.arrayFromVolume(out).transpose(2, 1, 0)
        with outputs:  # marked AI-generated in the file's header and in its sidecar, as the medil command does
            outputs.stage(Volume(np.asarray(array), ijk_to_ras(out)), args.output, provenance=node_provenance(out, args, argv))
    except (MedILError, MedILSlicerError) as exc:
        print(f"medil_batch: error: {exc}", file=sys.stderr)
        return 1
    print(f"medil_batch: wrote {args.output}", file=sys.stderr)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def main() -> None:
    argv = sys.argv[1:]
    if "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    import signal

    for name in ("SIGTERM", "SIGHUP"):  # end as Ctrl-C does: the backend is stopped, temporary files removed
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupt)
    try:
        status = run(argv)
    except KeyboardInterrupt:
        print("medil_batch: interrupted; no output was written (a dataset: the scans that finished are kept)", file=sys.stderr)
        status = 130
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:  # inside the Slicer application
        slicer.util.exit(status)
    sys.exit(status)


if __name__ == "__main__":
    main()
