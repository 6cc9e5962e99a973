// Shared setup for the scenario programs in this folder: command-line options, the provider model, the
// JSON report line, and error handling. Each program runs one AI SDK call and prints one JSON line.

import { parseArgs } from 'node:util';

import { createAnthropic } from '@ai-sdk/anthropic';
import { createOpenAI } from '@ai-sdk/openai';

export const USAGE = `Options (each falls back to the environment variable in brackets):
  --provider NAME     anthropic, openai-chat or openai-responses [TOLLHOUSE_PROVIDER]
  --base-url URL      the SDK's baseURL, e.g. http://127.0.0.1:8787/v1 [TOLLHOUSE_BASE_URL]
  --api-key KEY       the key the SDK sends as its API key [TOLLHOUSE_API_KEY]
  --model ID          the model id [TOLLHOUSE_MODEL]
  --prompt TEXT       the user message (default: "Say hello.")
  --header NAME=VALUE an extra request header, repeatable
  --timeout-ms N      abort the whole scenario after N milliseconds (default: 20000)`;

const PROVIDERS = ['anthropic', 'openai-chat', 'openai-responses'];

/**
 * Parses argv and the environment into the scenario options, or throws an Error that names the bad value.
 * `extraOptions` adds `parseArgs` option specs of one program, whose values end up in `options.extra`.
 */
export function readOptions(extraOptions = {}, argv = process.argv.slice(2), env = process.env) {
  const { values } = parseArgs({
    args: argv,
    options: {
      ...extraOptions,
      provider: { type: 'string' },
      'base-url': { type: 'string' },
      'api-key': { type: 'string' },
      model: { type: 'string' },
      prompt: { type: 'string' },
      header: { type: 'string', multiple: true },
      'timeout-ms': { type: 'string' },
    },
    strict: true,
  });

  const options = {
    provider: values.provider ?? env.TOLLHOUSE_PROVIDER,
    baseURL: values['base-url'] ?? env.TOLLHOUSE_BASE_URL,
    apiKey: values['api-key'] ?? env.TOLLHOUSE_API_KEY,
    model: values.model ?? env.TOLLHOUSE_MODEL,
    prompt: values.prompt ?? 'Say hello.',
    headers: {},
    timeoutMs: Number(values['timeout-ms'] ?? '20000'),
    extra: Object.fromEntries(Object.keys(extraOptions).map((name) => [name, values[name]])),
  };
  for (const [name, option] of [['provider', '--provider'], ['baseURL', '--base-url'], ['apiKey', '--api-key'], ['model', '--model']]) {
    if (!options[name]) {
      throw new Error(`missing ${option}. Pass it or set its environment variable.\n${USAGE}`);
    }
  }
  if (!PROVIDERS.includes(options.provider)) {
    throw new Error(`invalid --provider ${JSON.stringify(options.provider)}. Expected one of ${PROVIDERS.join(', ')}.`);
  }
  if (!Number.isInteger(options.timeoutMs) || options.timeoutMs <= 0) {
    throw new Error(`invalid --timeout-ms ${JSON.stringify(values['timeout-ms'])}. Expected a positive integer.`);
  }
  for (const pair of values.header ?? []) {
    const separator = pair.indexOf('=');
    if (separator <= 0) {
      throw new Error(`invalid --header ${JSON.stringify(pair)}. Expected NAME=VALUE.`);
    }
    options.headers[pair.slice(0, separator)] = pair.slice(separator + 1);
  }
  return options;
}

/**
 * Creates the language model for `options.provider`, the way a project points an SDK at the gateway.
 * `openai-chat` uses the Chat Completions API and `openai-responses` the Responses API, which is the
 * default of `openai(modelId)` in @ai-sdk/openai 3.
 */
export function createModel(options) {
  if (options.provider === 'anthropic') {
    const anthropic = createAnthropic({ baseURL: options.baseURL, apiKey: options.apiKey });
    return anthropic(options.model);
  }
  const openai = createOpenAI({ baseURL: options.baseURL, apiKey: options.apiKey });
  return options.provider === 'openai-chat' ? openai.chat(options.model) : openai.responses(options.model);
}

/** Returns the SDK's usage object without the provider's raw usage, so that the report shows the mapping. */
export function describeUsage(usage) {
  if (usage === undefined) {
    return null;
  }
  const { raw, ...mapped } = usage;
  return mapped;
}

/** Returns what a test needs from one step: its text, tool calls, finish reason, usage and response metadata. */
export function describeStep(step) {
  return {
    text: step.text,
    finishReason: step.finishReason,
    rawFinishReason: step.rawFinishReason ?? null,
    toolCalls: step.toolCalls.map(describeToolCall),
    toolResults: step.toolResults.map(({ toolCallId, toolName, input, output }) => ({ toolCallId, toolName, input, output })),
    usage: describeUsage(step.usage),
    response: describeResponse(step.response),
  };
}

export function describeToolCall({ toolCallId, toolName, input, invalid, error }) {
  const call = { toolCallId, toolName, input };
  if (invalid) {
    call.invalid = true;
    call.error = String(error);
  }
  return call;
}

/** Returns the response id, model id and headers, which include `x-tollhouse-request-id` behind the gateway. */
export function describeResponse(response) {
  return { id: response.id, modelId: response.modelId, headers: response.headers ?? {} };
}

/** Writes the report as one JSON line on stdout. */
export function report(result) {
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

/**
 * Runs `scenario(options, abortSignal)` and reports its result. `extraOptions` is passed to `readOptions`. Invalid options exit with status 2, and a
 * failed or timed-out call exits with status 1 after writing the error (with status code and response
 * body when the SDK has them) to stderr.
 */
export async function main(scenario, extraOptions = {}) {
  let options;
  try {
    options = readOptions(extraOptions);
  } catch (error) {
    process.stderr.write(`${error.message}\n`);
    process.exit(2);
  }
  const abortSignal = AbortSignal.timeout(options.timeoutMs);
  try {
    report(await scenario(options, abortSignal));
  } catch (error) {
    const details = { name: error?.name, message: error?.message };
    if (abortSignal.aborted) {
      details.message = `timed out after ${options.timeoutMs} ms: ${details.message}`;
    }
    for (const field of ['statusCode', 'url', 'responseBody', 'responseHeaders']) {
      if (error?.[field] !== undefined) {
        details[field] = error[field];
      }
    }
    if (error?.cause !== undefined) {
      details.cause = String(error.cause);
    }
    process.stderr.write(`scenario failed: ${JSON.stringify(details)}\n`);
    process.exit(1);
  }
}
