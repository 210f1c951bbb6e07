"""Inverse-consistent deformable registration: SITReg and the two-step ICON network.

Modules: :mod:`.config` (dataclasses and presets), :mod:`.sitreg`, :mod:`.icon` (networks),
:mod:`.losses`, :mod:`.register` (file-pair registration with exact geometry),
:mod:`.training`, :mod:`.commands` (CLI).
"""
