// Greedy tokens from transformers.js (Node) for a model folder.
//
// usage: node transformers_js_generate.mjs <dir holding node_modules> < request.json
// request: {"model": folder, "prompts": [[ids...]], "max_new_tokens": n, "text": "...",
//           "subfolder": optional, where the .onnx file lies ("" for the top of the folder)}
// prints one JSON line: {"generated": [[new ids...]], "encoded": [ids of text]}
// The folder is read from disk only: remote models are switched off.
import path from "node:path";
import { pathToFileURL } from "node:url";

const [, , packageRoot] = process.argv;
const entry = path.join(
  packageRoot,
  "node_modules/@huggingface/transformers/dist/transformers.node.mjs",
);
const { env, AutoModelForCausalLM, AutoTokenizer, Tensor } = await import(
  pathToFileURL(entry).href
);

let input = "";
for await (const chunk of process.stdin) input += chunk;
const request = JSON.parse(input);

// A local model id is a path under env.localModelPath.
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(request.model)) + path.sep;
const modelId = path.basename(request.model);

const tokenizer = await AutoTokenizer.from_pretrained(modelId);
const options = request.subfolder === undefined ? {} : { subfolder: request.subfolder };
const model = await AutoModelForCausalLM.from_pretrained(modelId, options);
const generated = [];
for (const prompt of request.prompts) {
  const input_ids = new Tensor("int64", BigInt64Array.from(prompt.map(BigInt)), [1, prompt.length]);
  const output = await model.generate({
    input_ids,
    max_new_tokens: request.max_new_tokens,
    do_sample: false,
  });
  generated.push(Array.from(output.data, Number).slice(prompt.length));
}
const encoded = Array.from(tokenizer(request.text).input_ids.data, Number);
console.log(JSON.stringify({ generated, encoded }));
