"""Hostile and broken input files for the fuzz test (Testing/test_reliability.py) and the outcome report
(benchmarks/fuzz_inputs.py): valid files of the four input families (NIfTI, NRRD, MHA/MHD, DICOM series)
whose headers are then mutated the way broken writers and hostile senders do."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

FAMILIES = ("nifti", "nrrd", "metaio", "dicom")


def rotation(deg: float, axis: int = 2) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


_SPECIAL = [0.0, -1.0, 1e-9, 1e30, -1e30, np.nan, np.inf, 1e-300, 3.0, 1 + 1e-7, 1e7, -3.0, 2**31, 3.4e38]
_TEXT = ["0", "-1", "-3", "1e30", "3.4e38", "nan", "", "%s%s%s%s%s%s%s%s", "%n%n%n", "../../etc/passwd", "/dev/zero", "LOCAL", "LIST",
         "x" * 5000, "1 2", "True", "False", "MET_UNKNOWN", "2 2 2 2 2 2"]  # fmt: skip


def nifti_mutant(rng: np.random.Generator, path: Path) -> Path:
    """A valid NIfTI (.nii or a .hdr/.img pair) whose stored header fields are then overwritten."""
    arr = (rng.random((5, 4, 3)) * 200).astype(rng.choice([np.float32, np.int16, np.uint8, np.float64, np.int32]))
    aff = np.eye(4)
    aff[:3, :3] = rotation(float(rng.uniform(0, 90)), int(rng.integers(3))) * rng.uniform(0.3, 3, 3)
    aff[:3, 3] = rng.uniform(-100, 100, 3)
    pair = rng.random() < 0.3
    target = path.with_suffix(".hdr") if pair else path.with_suffix(".nii")
    img = (nib.Nifti1Pair if pair else nib.Nifti1Image)(arr, aff)
    if rng.random() < 0.5:
        img.set_qform(aff @ np.diag([1, 1, 1, 1.0]), code=1)
    nib.save(img, target)
    raw = bytearray(target.read_bytes())
    h = np.frombuffer(bytes(raw[:348]), dtype=nib.nifti1.header_dtype).copy()[0]
    for _ in range(int(rng.integers(1, 4))):
        choice = int(rng.integers(11))
        special = float(rng.choice(_SPECIAL))
        if choice == 0:
            h["pixdim"][int(rng.integers(0, 4))] = special
        elif choice in (1, 2, 3):
            h[("srow_x", "srow_y", "srow_z")[choice - 1]][int(rng.integers(4))] = special
        elif choice == 4:
            h["sform_code"] = int(rng.choice([0, 1, 2, 5, -1, 99]))
            h["qform_code"] = int(rng.choice([0, 1, 2, -4]))
        elif choice == 5:
            h["quatern_" + "bcd"[int(rng.integers(3))]] = special
        elif choice == 6:
            h["scl_slope"], h["scl_inter"] = special, float(rng.choice([0.0, 1e30, np.nan]))
        elif choice == 7:
            h["dim"][int(rng.integers(0, 5))] = int(rng.choice([0, 1, 2, 4, 7, -3, 30000, 32767]))
        elif choice == 8:
            h["xyzt_units"] = int(rng.choice([0, 1, 2, 3, 4, 7, 8, 10, 255]))
        elif choice == 9:
            h["datatype"] = int(rng.choice([0, 1, 2, 4, 16, 32, 128, 2304, 255, 1792]))
            h["bitpix"] = int(rng.choice([0, 8, 16, 33]))
        else:
            h["vox_offset"] = float(rng.choice([0.0, 1e9, -1.0, 352.0, 351.0, np.nan]))
    raw[:348] = h.tobytes()
    if rng.random() < 0.2:  # a byte of the header flipped at random
        raw[int(rng.integers(40, 348))] ^= int(rng.integers(1, 256))
    target.write_bytes(bytes(raw))
    if pair and rng.random() < 0.15:  # the image file replaced by a link out of the folder
        img_file = target.with_suffix(".img")
        img_file.unlink()
        os.symlink(rng.choice(["/etc/hostname", "/dev/zero", "../outside.img"]), img_file)
    return target


def _mutate_lines(rng, lines: list[str], sep: str, keys: tuple[str, ...]) -> list[str]:
    for _ in range(int(rng.integers(1, 4))):
        op = rng.random()
        idx = [n for n, ln in enumerate(lines) if ln.split(sep)[0].strip().lower() in keys] or list(range(len(lines)))
        i = int(rng.choice(idx)) if rng.random() < 0.7 else int(rng.integers(0, len(lines)))
        key, _, value = lines[i].partition(sep)
        if op < 0.55:
            pick = str(rng.choice(_TEXT + [value + value, value.replace(" ", "  ")]))
            lines[i] = f"{key}{sep} {pick}"
        elif op < 0.65:  # a decoy line in another spelling before the real one
            lines.insert(i, f"{key.lower().replace(' ', '')}{sep} {rng.choice(['LOCAL', '../x.raw', '1 1 1'])}")
        elif op < 0.75:  # the line given twice
            lines.insert(i + 1, lines[i])
        elif op < 0.85:  # padding that pushes the rest past 64 KiB
            lines.insert(i, "#" + "p" * 70000 if sep == ":" else "Comment = " + "p" * 70000)
        elif op < 0.93:  # the other separator
            lines[i] = f"{key}{':' if sep != ':' else ' ='} {value.strip()}"
        else:
            del lines[i]
    return lines


def nrrd_mutant(rng: np.random.Generator, path: Path) -> Path:
    img = sitk.GetImageFromArray((rng.random((3, 4, 5)) * 200).astype(rng.choice([np.float32, np.int16, np.uint8])))
    img.SetDirection(rotation(float(rng.uniform(0, 90)), int(rng.integers(3))).ravel().tolist())
    detached = rng.random() < 0.3
    target = path.with_suffix(".nhdr" if detached else ".nrrd")
    sitk.WriteImage(img, str(target), useCompression=bool(rng.random() < 0.5))
    data = target.read_bytes()
    if detached:
        head, sep, body = data, b"", b""
    else:
        head, sep, body = data.partition(b"\n\n")
    lines = head.decode("latin-1").rstrip("\n").split("\n")
    keys = ("space directions", "space origin", "sizes", "dimension", "type", "encoding", "endian", "data file", "byte skip", "space")
    lines = [lines[0]] + _mutate_lines(rng, lines[1:], ":", keys)
    if rng.random() < 0.1:
        lines = [ln if not ln.startswith("encoding") else "encoding: ascii" for ln in lines]
    target.write_bytes("\n".join(lines).encode("latin-1") + (sep + body if not detached else b"\n"))
    return target


def metaio_mutant(rng: np.random.Generator, path: Path) -> Path:
    dtype = rng.choice([np.float32, np.int16, np.uint8, np.int32, np.float64])
    img = sitk.GetImageFromArray((rng.random((3, 4, 5)) * 200).astype(dtype))
    img.SetDirection(rotation(float(rng.uniform(0, 90)), int(rng.integers(3))).ravel().tolist())
    img.SetOrigin(rng.uniform(-50, 50, 3).tolist())
    detached = rng.random() < 0.4
    target = path.with_suffix(".mhd" if detached else ".mha")
    sitk.WriteImage(img, str(target), useCompression=bool(rng.random() < 0.5))
    data = target.read_bytes()
    cut = data.index(b"ElementDataFile")
    cut = data.index(b"\n", cut) + 1
    head, body = data[:cut], data[cut:]
    lines = head.decode("latin-1").rstrip("\n").split("\n")
    keys = ("ndims", "dimsize", "elementtype", "elementspacing", "transformmatrix", "offset", "compresseddata",
            "compresseddatasize", "binarydatabyteordermsb", "elementdatafile", "headersize", "elementnumberofchannels")  # fmt: skip
    lines = _mutate_lines(rng, lines, "=", keys)
    if not any(ln.split("=")[0].split(":")[0].strip() == "ElementDataFile" for ln in lines) and rng.random() < 0.5:
        lines.append("ElementDataFile = LOCAL")
    if rng.random() < 0.15 and not detached:  # compressed data declared, raw data stored (or the reverse)
        lines = [("CompressedData = True" if ln.startswith("CompressedData =") else ln) for ln in lines]
    if rng.random() < 0.1:
        body = body[: len(body) // 2]
    target.write_bytes("\n".join(lines).encode("latin-1") + b"\n" + body)
    return target


def write_series(folder: Path, n: int = 6, *, tilt_mm: float = 0.0, odd: dict | None = None, modality: str = "CT") -> Path:
    """A DICOM series of ``n`` slices; ``tilt_mm``: each slice's position moves this far along y (gantry tilt);
    ``odd``: tags of the middle slice that differ from the others' (orientation, pixel spacing)."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(0).random((n, 12, 10)) * 1000 - 500).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.4243"
    for k in range(n):
        s = sitk.GetImageFromArray(arr[k : k + 1])[:, :, 0]
        tags = {"0020|000e": uid, "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0060": modality, "0020|0013": str(k), "0028|0030": "1\\1"}
        if odd and k == n // 2:
            tags.update({t: v for t, v in odd.items() if t != "spacing"})
            if "spacing" in odd:  # the writer takes the pixel spacing from the image, not from a tag
                s.SetSpacing(odd["spacing"])
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", f"0\\{tilt_mm * k}\\{2.0 * k}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def dicom_mutant(rng: np.random.Generator, path: Path) -> Path:
    folder = path.with_suffix("")
    kind = int(rng.integers(6))
    if kind == 0:
        return write_series(folder, tilt_mm=float(rng.choice([0.5, 2.0, 10.0])))
    if kind == 1:
        return write_series(folder, odd={"spacing": [(0.5, 0.5), (1.0, 2.0), (1.0, 1.00001), (3.0, 1.0)][int(rng.integers(4))]})
    if kind == 2:
        return write_series(folder, odd={"0020|0037": str(rng.choice(["0\\1\\0\\1\\0\\0", "1\\0\\0\\0\\0.8\\0.6"]))})
    write_series(folder)
    files = sorted(folder.iterdir())
    victim = files[int(rng.integers(len(files)))]
    if kind == 3:
        victim.write_bytes(victim.read_bytes()[: int(rng.integers(10, victim.stat().st_size))])
    elif kind == 4:
        raw = bytearray(victim.read_bytes())
        for _ in range(int(rng.integers(1, 20))):
            raw[int(rng.integers(132, len(raw)))] ^= int(rng.integers(1, 256))
        victim.write_bytes(bytes(raw))
    else:
        victim.unlink()
    return folder


MUTANTS = {"nifti": nifti_mutant, "nrrd": nrrd_mutant, "metaio": metaio_mutant, "dicom": dicom_mutant}
