"""Translation between OpenAI Chat Completions and Anthropic Messages: requests, responses, streams, errors.

The functions take and return parsed JSON bodies (dicts), except the error and stream translators, which
return bytes ready to send. A request that cannot be translated raises `TranslationError`, which names the
offending field so that the gateway can return a 400 error in the client's format.
"""

from addons.translation.errors import TranslationError, error_to_anthropic, error_to_openai
from addons.translation.requests import chat_to_messages_request, messages_to_chat_request
from addons.translation.responses import chat_to_messages_response, messages_to_chat_response
from addons.translation.streams import ChatToMessagesStream, MessagesToChatStream
from addons.translation.usage import FINISH_REASONS, STOP_REASONS, anthropic_usage, openai_usage

__all__ = [
    "FINISH_REASONS",
    "STOP_REASONS",
    "ChatToMessagesStream",
    "MessagesToChatStream",
    "TranslationError",
    "anthropic_usage",
    "chat_to_messages_request",
    "chat_to_messages_response",
    "error_to_anthropic",
    "error_to_openai",
    "messages_to_chat_request",
    "messages_to_chat_response",
    "openai_usage",
]
