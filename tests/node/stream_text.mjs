// Calls streamText once, reads the whole stream, and prints the text deltas, finish reason, usage and
// response headers as one JSON line. Takes the same options as generate_text.mjs.

import { streamText } from 'ai';

import { createModel, describeResponse, describeUsage, main } from './lib.mjs';

await main(async (options, abortSignal) => {
  const result = streamText({
    model: createModel(options),
    prompt: options.prompt,
    headers: options.headers,
    maxRetries: 0,
    abortSignal,
    // The loop below rethrows stream errors, so the default handler's console output would repeat them.
    onError() {},
  });

  // The loop reads fullStream because it carries stream errors as `error` parts. textStream leaves them out,
  // and `result.text` then rejects with NoOutputGeneratedError, which hides the cause (ai 6.0.333).
  const textDeltas = [];
  for await (const part of result.fullStream) {
    if (part.type === 'text-delta') {
      textDeltas.push(part.text);
    } else if (part.type === 'error') {
      throw part.error;
    }
  }

  return {
    scenario: 'stream-text',
    provider: options.provider,
    text: await result.text,
    textDeltas,
    finishReason: await result.finishReason,
    rawFinishReason: (await result.rawFinishReason) ?? null,
    toolCalls: await result.toolCalls,
    usage: describeUsage(await result.usage),
    response: describeResponse(await result.response),
  };
});
