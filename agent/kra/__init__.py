"""KRA eTIMS OSCU adapter: the client, payload builder, result-code classes, the signing lane and
the OSCU simulator. httpx exceptions never leave this package."""
