"""Triton Inference Server model repositories from a built bundle (`voxport package format=triton`)."""

from voxport.export.triton.repository import Package, PackageConfig, package_triton

__all__ = ["Package", "PackageConfig", "package_triton"]
