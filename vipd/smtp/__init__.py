"""Sans-IO SMTP: replies, command parsing, byte framing, and the server and client state machines.

Imports no asyncio, socket or time: everything here takes bytes and returns values.
"""
