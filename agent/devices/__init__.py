"""Serial intake (framing and the port loop) and receipt printers. pyserial exceptions never
leave this package."""
