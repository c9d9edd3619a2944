"""The TSMS terminal's API key and bearer token, kept in the secret store (never in the database)."""

from __future__ import annotations

from agent.keystore import SecretStore
from agent.secret import Secret

API_KEY = "tsms.api_key"
TOKEN = "tsms.token"


class StoredCredentials:
    """The API key from config/environment if given there, else from the store; the token in the store."""

    def __init__(self, secrets: SecretStore | None, configured_key: Secret | None) -> None:
        self._secrets = secrets
        self._configured = configured_key
        self._token: Secret | None = None
        self._loaded = False

    def api_key(self) -> Secret | None:
        if self._configured is not None or self._secrets is None:
            return self._configured
        return self._secrets.get(API_KEY)

    def token(self) -> Secret | None:
        if not self._loaded and self._secrets is not None:
            self._token, self._loaded = self._secrets.get(TOKEN), True
        return self._token

    def save_token(self, token: Secret | None) -> None:
        self._token, self._loaded = token, True
        if self._secrets is None:
            return
        if token is None:
            self._secrets.delete(TOKEN)
        else:
            self._secrets.set(TOKEN, token)
