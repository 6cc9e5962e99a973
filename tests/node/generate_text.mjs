// Calls generateText once and prints the text, finish reason, usage and response headers as one JSON line.
// Usage: node generate_text.mjs --provider anthropic --base-url URL --api-key KEY --model ID [--header N=V]...

import { generateText } from 'ai';

import { createModel, describeResponse, describeUsage, main } from './lib.mjs';

await main(async (options, abortSignal) => {
  const result = await generateText({
    model: createModel(options),
    prompt: options.prompt,
    headers: options.headers,
    maxRetries: 0,
    abortSignal,
  });
  return {
    scenario: 'generate-text',
    provider: options.provider,
    text: result.text,
    finishReason: result.finishReason,
    rawFinishReason: result.rawFinishReason ?? null,
    toolCalls: result.toolCalls,
    usage: describeUsage(result.usage),
    response: describeResponse(result.response),
  };
});
