"""keystate tools."""

if __name__ != "keystate.tools":
    # One import root: this folder is installed as keystate.tools. Refusing the bare name keeps every file
    # importable under exactly one module name (two copies of one module mean two copies of its classes).
    raise ImportError(f"import keystate.tools, not {__name__!r}: keystate installs a single top-level package")
