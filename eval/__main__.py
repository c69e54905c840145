"""`python -m eval {inpainting,prompts,table} ...` (see eval/__init__.py)."""
import sys


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = ("inpainting", "prompts", "table")
  if not argv or argv[0] not in commands:
    print(__import__("eval").__doc__, file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2
  import importlib
  return importlib.import_module(f"eval.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
