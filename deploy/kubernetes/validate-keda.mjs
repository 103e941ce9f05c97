// Validates KEDA ScaledObjects against the schema of @kubernetes-models/keda
// (generated from KEDA's Go API types: required fields, types, e.g. trigger
// metadata values must be strings), then refuses fields that schema does not
// know (it allows them, so a misspelt field would pass otherwise).
//
//   node validate-keda.mjs NODE_MODULES_DIR SCALEDOBJECTS.json
//
// SCALEDOBJECTS.json: [{"source": "overlay eu", "object": {...}}, ...].
// Prints one line per problem and exits 1 when there is any.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, input] = process.argv.slice(2);
if (!modules || !input) {
  console.error("usage: node validate-keda.mjs NODE_MODULES_DIR SCALEDOBJECTS.json");
  process.exit(2);
}
const pkg = join(modules, "@kubernetes-models", "keda");
const { ScaledObject } = await import(
  pathToFileURL(join(pkg, "keda.sh", "v1alpha1", "ScaledObject.js")).href
);

// The properties a compiled schema validates (`data.<name>` it reads).
function known(schema) {
  const text = readFileSync(
    join(pkg, "_schemas", `ComGithubKedacoreKedaV2ApisKedaV1alpha1${schema}.js`),
    "utf8",
  );
  const names = new Set();
  for (const m of text.matchAll(/void 0[!=]==data\.([A-Za-z_][A-Za-z0-9_]*)/g)) names.add(m[1]);
  if (names.size === 0) throw new Error(`no properties found in the ${schema} schema`);
  return names;
}
const shapes = {
  spec: known("ScaledObjectSpec"),
  scaleTargetRef: known("ScaleTarget"),
  advanced: known("AdvancedConfig"),
  trigger: known("ScaleTriggers"),
};
const topLevel = new Set(["apiVersion", "kind", "metadata", "spec", "status"]);

const problems = [];
function unknownKeys(source, path, value, allowed) {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return;
  for (const key of Object.keys(value)) {
    if (!allowed.has(key)) problems.push(`${source}: ${path}.${key}: unknown field (known: ${[...allowed].sort().join(", ")})`);
  }
}

const objects = JSON.parse(readFileSync(input, "utf8"));
for (const { source, object } of objects) {
  const name = `${source}: ScaledObject ${object?.metadata?.name ?? "(no name)"}`;
  try {
    new ScaledObject(object).validate();
  } catch (e) {
    problems.push(`${name}: ${e.message}`);
  }
  unknownKeys(name, "", object, topLevel);
  const spec = object?.spec ?? {};
  unknownKeys(name, ".spec", spec, shapes.spec);
  unknownKeys(name, ".spec.scaleTargetRef", spec.scaleTargetRef, shapes.scaleTargetRef);
  unknownKeys(name, ".spec.advanced", spec.advanced, shapes.advanced);
  (Array.isArray(spec.triggers) ? spec.triggers : []).forEach((t, i) =>
    unknownKeys(name, `.spec.triggers[${i}]`, t, shapes.trigger),
  );
}

for (const p of problems) console.log(p);
if (!problems.length) console.log(`    ${objects.length} ScaledObjects valid`);
process.exit(problems.length ? 1 : 0);
