// Validates an AsyncAPI document with the AsyncAPI project's own parser
// (@asyncapi/parser): prints every diagnostic, exits 1 on any error.
//   node validate.mjs docs/asyncapi.json
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";

const require = createRequire(process.env.ASYNCAPI_PARSER_DIR + "/");
const { Parser } = require("@asyncapi/parser");

const path = process.argv[2];
const text = await readFile(path, "utf8");
const parser = new Parser();
const { document, diagnostics } = await parser.parse(text);
// Severity 0 is an error; 1 warning, 2 information, 3 hint.
const errors = diagnostics.filter((d) => d.severity === 0);
for (const d of diagnostics) {
  const where = (d.path || []).join(".");
  const level = ["error", "warning", "info", "hint"][d.severity] ?? d.severity;
  console.error(`asyncapi: ${level}: ${d.message}${where ? ` (at ${where})` : ""}`);
}
if (!document || errors.length > 0) {
  console.error(`asyncapi: ${path} is NOT valid (${errors.length} error(s))`);
  process.exit(1);
}
const messages = document.allMessages().length;
const operations = document.operations().length;
console.error(
  `asyncapi: ${path} is valid AsyncAPI ${document.version()}: ${messages} messages, ${operations} operations`,
);
