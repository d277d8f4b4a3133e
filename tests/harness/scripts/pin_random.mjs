// Preloaded with `node --import`: replaces crypto.randomBytes so the Capgo CLI's session key
// and IV are the ones the test chose (16-byte draws are served from CAPGO_PIN_RANDOM in order).
import { createRequire, syncBuiltinESMExports } from "node:module";
const require = createRequire(import.meta.url);
const crypto = require("node:crypto");
const queue = (process.env.CAPGO_PIN_RANDOM || "").split(",").filter(Boolean)
  .map((h) => Buffer.from(h, "hex"));
const original = crypto.randomBytes;
crypto.randomBytes = function (size, cb) {
  if (size === 16 && queue.length > 0 && cb === undefined) return queue.shift();
  return original.apply(this, arguments);
};
syncBuiltinESMExports();
