"""The best a classifier could do: class averages from the true labels and poses.

Each view's particles are aligned with their recorded poses and averaged with
a CTF Wiener filter; junk goes into one extra class. Scoring this "oracle"
classification shows what a simulated data set allows (e.g. whether a rare
view of 60 particles can reach 25 Å at all) and is a reference for the
classifier's scores. Written in the same files a classifier writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import starfile
import torch

from napari_class2d.sim.ctf import relion_ctf_2d
from napari_class2d.sim.files import write_stack, write_star
from napari_class2d.sim.threads import torch_threads
from napari_class2d.sim.transforms import (
    fourier_upsample,
    rotate_upsampled,
    shift_padded,
    soft_disk,
)


def oracle_classification(
    truth_dir: str | Path, out_dir: str | Path, chunk: int = 256, wiener_constant: float = 1.0
) -> dict[str, Path]:
    """Write ``run_data.star`` and ``run_classes.mrcs`` of the true classification.

    Class ``v + 1`` is view ``v`` (its average in the frame of the view's truth
    projection, so its particles' ``rlnAnglePsi``/``rlnOrigin*`` are the true
    poses); class ``n_views + 1`` holds the junk (unaligned mean).

    Parameters
    ----------
    truth_dir
        A simulation folder.
    out_dir
        Where to write the two files (created).
    chunk
        Particles processed at a time.
    wiener_constant
        Added to the summed CTF^2 per particle-equivalent (noise/signal power
        ratio of the Wiener filter, per particle, relative to white noise).
    """
    truth_dir, out = Path(truth_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = json.loads((truth_dir / "truth.json").read_text())
    blocks = starfile.read(truth_dir / "particles.star", always_dict=True)
    parts = blocks["particles"]
    truth = next(iter(starfile.read(truth_dir / "truth.star", always_dict=True).values()))
    box, apix = int(info["box"]), float(info["pixel_size_A"])
    n_views = int(info["n_views"])
    p = info["parameters"]
    has_ctf = bool(p.get("ctf", True))
    stacks: dict[str, np.ndarray] = {}

    def images(rows: np.ndarray) -> torch.Tensor:
        out_img = np.empty((len(rows), box, box), dtype=np.float32)
        for k, name in enumerate(parts["rlnImageName"].to_numpy()[rows]):
            idx, stack = name.split("@", 1)
            if stack not in stacks:
                stacks[stack] = mrcfile.mmap(truth_dir / stack, permissive=True).data
            out_img[k] = stacks[stack][int(idx) - 1]
        return torch.as_tensor(out_img)

    view = truth["sim_view"].to_numpy()
    averages = np.zeros((n_views + 1, box, box), dtype=np.float32)
    mask = soft_disk(box, 0.55 * info["particle_diameter_A"] / apix, edge_px=4.0)
    with torch_threads(1):
        for v in range(n_views):
            rows = np.nonzero(view == v)[0]
            num = torch.zeros(box, box // 2 + 1, dtype=torch.complex64)
            den = torch.zeros(box, box // 2 + 1)
            for s in range(0, len(rows), chunk):
                r = rows[s : s + chunk]
                x = torch.fft.rfftn(images(r), dim=(-2, -1))
                psi = truth["sim_psi_deg"].to_numpy()[r]
                t = truth[["sim_shift_x_A", "sim_shift_y_A"]].to_numpy()[r] / apix
                if has_ctf:
                    du, dv = parts["rlnDefocusU"].to_numpy()[r], parts["rlnDefocusV"].to_numpy()[r]
                    ang = parts["rlnDefocusAngle"].to_numpy()[r]
                    kw = dict(
                        voltage_kV=p["voltage_kV"],
                        cs_mm=p["cs_mm"],
                        amplitude_contrast=p["amplitude_contrast"],
                        pixel_size_A=apix,
                        box=box,
                    )
                    ctf = relion_ctf_2d(du, dv, ang, **kw)
                    # the CTF seen in the view's frame: the astigmatism turns with the particle
                    ctf_view = relion_ctf_2d(du, dv, ang + psi, **kw)
                else:
                    ctf = ctf_view = torch.ones(len(r), box, box // 2 + 1)
                weighted = torch.fft.irfftn(x * ctf, dim=(-2, -1), s=(box, box))
                back = shift_padded(weighted, torch.as_tensor(-t, dtype=torch.float32))
                aligned = rotate_upsampled(
                    fourier_upsample(back, 2), torch.as_tensor(-psi, dtype=torch.float32), box
                )
                num += torch.fft.rfftn(aligned, dim=(-2, -1)).sum(0)
                den += (ctf_view**2).sum(0)
            avg = torch.fft.irfftn(num / (den + wiener_constant), dim=(-2, -1), s=(box, box))
            averages[v] = (avg * mask).numpy()
        junk = np.nonzero(view < 0)[0]
        if len(junk):
            averages[n_views] = images(junk[:2000]).mean(0).numpy()

    data = parts.copy()
    data["rlnClassNumber"] = np.where(view < 0, n_views + 1, view + 1)
    data["rlnAnglePsi"] = truth["sim_psi_deg"].to_numpy()
    data["rlnOriginXAngst"] = -truth["sim_shift_x_A"].to_numpy()
    data["rlnOriginYAngst"] = -truth["sim_shift_y_A"].to_numpy()
    # image names relative to the truth folder: make them absolute for the new location
    names = data["rlnImageName"].str.split("@", n=1, expand=True)
    data["rlnImageName"] = names[0] + "@" + str(truth_dir.resolve()) + "/" + names[1]
    paths = {
        "data": write_star(out / "run_data.star", {"optics": blocks["optics"], "particles": data}),
        "classes": write_stack(out / "run_classes.mrcs", averages, apix),
    }
    return paths
