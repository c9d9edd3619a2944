"""The SQLite outbox: schema and migrations, the sale rows with both lanes' states, the journal.

Run the agent only as `python -m agent` or `etims-agent`: if this folder's parent were put on
sys.path, `agent/queue` would shadow the standard library's `queue`.
"""
