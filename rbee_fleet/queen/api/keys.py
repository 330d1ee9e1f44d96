"""Typed keys of the queen's application state."""

from aiohttp import web

from rbee_fleet.queen.settings import QueenSettings
from rbee_fleet.queen.state import Queen

QUEEN = web.AppKey("queen", Queen)
SETTINGS = web.AppKey("settings", QueenSettings)
