// Offers the model one tool, defined with the SDK's tool() helper and a zod input schema, and runs up to
// two steps: the model calls the tool, the SDK executes it, and the model replies to the tool result.
// Prints every step (tool calls with the input the SDK parsed, tool results, finish reason, usage and
// response headers) as one JSON line. Takes the options of generate_text.mjs, plus --stream to use
// streamText instead of generateText.

import { generateText, stepCountIs, streamText, tool } from 'ai';
import { z } from 'zod';

import { createModel, describeStep, describeUsage, main } from './lib.mjs';

const getWeather = tool({
  description: 'Get the current temperature in a city.',
  inputSchema: z.object({
    city: z.string().describe('The city name.'),
    unit: z.enum(['celsius', 'fahrenheit']).describe('The temperature unit.'),
  }),
  execute: async ({ city, unit }) => ({ city, unit, temperature: unit === 'celsius' ? 21 : 70 }),
});

await main(
  async (options, abortSignal) => {
    const settings = {
      model: createModel(options),
      prompt: options.prompt,
      tools: { get_weather: getWeather },
      stopWhen: stepCountIs(2),
      headers: options.headers,
      maxRetries: 0,
      abortSignal,
    };

    let steps;
    let text;
    let totalUsage;
    if (options.extra.stream) {
      // The loop below rethrows stream errors, so the default handler's console output would repeat them.
      const result = streamText({ ...settings, onError() {} });
      for await (const part of result.fullStream) {
        if (part.type === 'error') {
          throw part.error;
        }
      }
      [steps, text, totalUsage] = await Promise.all([result.steps, result.text, result.totalUsage]);
    } else {
      const result = await generateText(settings);
      [steps, text, totalUsage] = [result.steps, result.text, result.totalUsage];
    }

    return {
      scenario: options.extra.stream ? 'tool-call-stream' : 'tool-call',
      provider: options.provider,
      text,
      totalUsage: describeUsage(totalUsage),
      steps: steps.map(describeStep),
    };
  },
  { stream: { type: 'boolean', default: false } },
);
