"""The base of the loader nodes that pick one .safetensors file from a model folder
(Load PTQ State, Load HiF4 Diffusion Model): where the name leads, when ComfyUI must
load it again, and what to say before a run when the pick is wrong."""
from __future__ import annotations

import os
from typing import ClassVar

from . import policy
from .comfy import folders


class FilePicker:
    """A node whose one input, INPUT, is a list of FOLDER's files (`choices`).

    Change rule (IS_CHANGED): the path the name leads to, with the file's mtime and
    size. A re-saved, replaced or re-pointed file loads again, while an unchanged one
    stays cached without reading it: a content hash would read a packed checkpoint
    (gigabytes) on every Queue."""

    FOLDER: ClassVar[str]
    INPUT: ClassVar[str]  # the input's name, as INPUT_TYPES declares it
    WHAT: ClassVar[str]  # what the files are, plural: "PTQ states"
    ONE: ClassVar[str]  # one of them: "PTQ state"
    HOW_TO_MAKE: ClassVar[str]  # the empty-list message's advice
    TOOLTIP: ClassVar[str]

    @classmethod
    def choices(cls) -> list[str]:
        return folders.file_names(cls.FOLDER)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {cls.INPUT: (cls.choices(), {"tooltip": cls.TOOLTIP})}}

    @classmethod
    def unpicked(cls, name) -> str | None:
        return policy.unpicked_file(name, cls.choices(), cls.WHAT, folders.folders(cls.FOLDER), cls.HOW_TO_MAKE)

    @classmethod
    def _path(cls, name) -> str:
        path = folders.file_path(cls.FOLDER, name) if policy.is_safetensors_name(name) else None
        if path is None:
            raise FileNotFoundError(f"{cls.ONE} {name!r} not found in {cls.FOLDER} "
                                    f"({', '.join(folders.folders(cls.FOLDER))})")
        return path

    @classmethod
    def picked_path(cls, name) -> str:
        """The file to load; FileNotFoundError saying what to do when there is none."""
        problem = cls.unpicked(name)
        if problem:
            raise FileNotFoundError(problem)
        return cls._path(name)

    @classmethod
    def file_problem(cls, name: str, path: str) -> str | None:
        """What is wrong with an existing file before loading it (None: nothing)."""
        return None

    @classmethod
    def IS_CHANGED(cls, **inputs):
        try:
            path = cls._path(inputs.get(cls.INPUT))
            st = os.stat(path)
        except OSError:
            return float("nan")  # never equal: let the node report the problem
        return f"{path}:{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def VALIDATE_INPUTS(cls, input_types, **inputs):
        # An empty list reaches us with no value at all (the frontend omits it), and ComfyUI
        # reports a custom message only per argument it passed: input_types is always passed.
        # (**inputs: ComfyUI passes every input and leaves the list check to us.)
        name = inputs.get(cls.INPUT)
        problem = cls.unpicked(name)
        if problem:
            return problem
        if not policy.is_safetensors_name(name):
            return f"{cls.WHAT} are .safetensors files, got {name!r}"
        try:
            path = cls._path(name)
        except FileNotFoundError as e:
            return str(e)
        return cls.file_problem(name, path) or True
