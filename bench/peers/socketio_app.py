"""The peer of bench/fanout.py: a minimal Flask-SocketIO app fed by Redis.

    PEER_REDIS_URL=redis://... PEER_CHANNEL=name gunicorn -w 1 \
        -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker socketio_app:app

A client joins a room by emitting `join` with its name (acknowledged);
broadcasts come from another process through the Redis message queue
(`socketio.RedisManager(url, channel=..., write_only=True).emit(...)`).
"""

import os

from flask import Flask
from flask_socketio import SocketIO, join_room

app = Flask(__name__)
socketio = SocketIO(app, async_mode="gevent", message_queue=os.environ["PEER_REDIS_URL"],
                    channel=os.environ.get("PEER_CHANNEL", "flask-socketio"))


@socketio.on("join")
def join(room):
    """Put this client in `room`; the ack tells the client it is in."""
    join_room(room)
    return "joined"
