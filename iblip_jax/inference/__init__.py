"""For people: the Python API (Pipeline: images and instructions in, answers out; Chat for follow-up questions) and
the terminal (`python -m iblip_jax.inference`). The work is the inference engine's (iblip_jax.engine); a training
workdir is restored through the main job's own path (iblip_jax.run.restore), the one place this layer reaches
into run/.
"""
from iblip_jax.data.conversation import Conversation
from iblip_jax.data.images import BadImage, PreparedImage, open_image, prepare
from iblip_jax.decoding import Decoding
from iblip_jax.engine import Answer, Chunk, Stream
from iblip_jax.errors import BadInput
from iblip_jax.inference.chat import Chat
from iblip_jax.inference.pipeline import BATCH_BUCKETS, Images, Pipeline, Ranking

__all__ = ["Answer", "BATCH_BUCKETS", "BadImage", "BadInput", "Chat", "Chunk", "Conversation", "Decoding",
           "Images", "Pipeline", "PreparedImage", "Ranking", "Stream", "open_image", "prepare"]
