"""Parity with the authors' released code: ``ovseg parity --ref NAME=DIR``.

Each module here runs one reference repository's **unmodified** files, imported from a checkout the user
names (small stand-ins replace the detectron2 / mmcv / mmseg / mmengine imports they need), beside ovseg on
the same random weights and generated images, and returns :class:`~ovseg.parity.common.ParityRecord` rows.
:mod:`ovseg.parity.report` writes them to ``benchmarks/PARITY.md`` and ``benchmarks/parity.json``; the
leaderboard reads the latter to mark which protocols have passed. Nothing of the references is copied here.
"""

#: reference name -> module with ``run(ref_dir: Path, device: str) -> list[ParityRecord]`` and ``PROTOCOLS``
#: (the ovseg protocols it checks), and where to get a checkout.
REFERENCES: dict[str, str] = {
    "PixelCLIP": "ovseg.parity.pixelclip",
    "MaskCLIP": "ovseg.parity.maskclip",
    "MaskCLIP+": "ovseg.parity.maskclip_plus",
    "SCLIP": "ovseg.parity.sclip",
    "NACLIP": "ovseg.parity.naclip",
    "ClearCLIP": "ovseg.parity.clearclip",
    "ResCLIP": "ovseg.parity.resclip",
    "SC-CLIP": "ovseg.parity.scclip",
    "ProxyCLIP": "ovseg.parity.proxyclip",
    "Trident": "ovseg.parity.trident",
    "ITACLIP": "ovseg.parity.itaclip",
    "CLIPtrase": "ovseg.parity.cliptrase",
    "LPOSS": "ovseg.parity.lposs",
    "DINO": "ovseg.parity.dino",
    "HSG": "ovseg.parity.hsg",
}
REPOSITORIES: dict[str, str] = {
    "PixelCLIP": "https://github.com/cvlab-kaist/PixelCLIP",
    "MaskCLIP": "https://github.com/chongzhou96/MaskCLIP",
    "MaskCLIP+": "https://github.com/chongzhou96/MaskCLIP",
    "SCLIP": "https://github.com/wangf3014/SCLIP",
    "NACLIP": "https://github.com/sinahmr/NACLIP",
    "ClearCLIP": "https://github.com/mc-lan/ClearCLIP",
    "ResCLIP": "https://github.com/yvhangyang/ResCLIP",
    "SC-CLIP": "https://github.com/SuleBai/SC-CLIP",
    "ProxyCLIP": "https://github.com/mc-lan/ProxyCLIP",
    "Trident": "https://github.com/YuHengsss/Trident",
    "ITACLIP": "https://github.com/m-arda-aydn/ITACLIP",
    "CLIPtrase": "https://github.com/leaves162/CLIPtrase",
    "LPOSS": "https://github.com/vladan-stojnic/LPOSS",
    "DINO": "https://github.com/facebookresearch/dino",
    "HSG": "https://github.com/twke18/HSG",
}
