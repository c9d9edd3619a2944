"""PyInstaller entry script.

It lives outside `agent/` on purpose: a script inside the package would put `agent/` on sys.path,
and `agent/queue/` would then shadow the standard library's `queue`.
"""

from agent.cli import main

if __name__ == "__main__":
    main()
