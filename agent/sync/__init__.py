"""Head-office TSMS adapter: the client, checksum canonicalisation, the batch sync lane and the
TSMS simulator. Independent of `agent.kra`: an outage of one never blocks the other."""
