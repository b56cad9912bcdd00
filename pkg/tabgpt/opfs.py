"""The browser's origin private file system (OPFS) from Python in Pyodide: the corpus cache and the saved run.

Only used where sys.platform == "emscripten"; natively the callers use ordinary files.
"""

from __future__ import annotations


async def _folder(name: str):
    from js import navigator
    root = await navigator.storage.getDirectory()
    return await root.getDirectoryHandle(name, create=True)


async def read(folder: str, name: str) -> bytes | None:
    """The bytes of folder/name, or None when it does not exist (or the browser has no OPFS)."""
    try:
        handle = await (await _folder(folder)).getFileHandle(name)
    except Exception:                       # NotFoundError, or no OPFS at all
        return None
    blob = await handle.getFile()
    return (await blob.arrayBuffer()).to_bytes()


async def write(folder: str, name: str, data: bytes, atomic: bool = False) -> None:
    """Write folder/name. atomic=True writes a temporary file and moves it over the old one, so that a reload
    in the middle keeps the previous version (FileSystemHandle.move: Chromium-based browsers)."""
    from pyodide.ffi import to_js
    d = await _folder(folder)
    handle = await d.getFileHandle(name + ".tmp" if atomic else name, create=True)
    writable = await handle.createWritable()
    await writable.write(to_js(memoryview(data)))
    await writable.close()
    if atomic:
        await handle.move(name)


async def remove(folder: str, name: str) -> None:
    """Delete folder/name where it exists."""
    try:
        await (await _folder(folder)).removeEntry(name)
    except Exception:                       # NotFoundError, or no OPFS at all
        pass
