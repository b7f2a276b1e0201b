// Snapshots, templates and images: the tables, and on a click what a snapshot needs of a
// host (and whether this one has it) or an image's layers and what holds it.

import { api, type Compatibility, type Image, type ImageDetails, q, type Snapshot } from "./api";
import { $, bytes, facts, linkButton, row, setStatus, shortDigest, shortImage, when } from "./view";

export async function refreshStores(): Promise<void> {
  let snapshots: Snapshot[], images: Image[];
  try {
    [snapshots, images] = await Promise.all([
      api<Snapshot[]>("GET", "/v1/snapshots"), api<Image[]>("GET", "/v1/images")]);
  } catch (error) {
    setStatus((error as Error).message);
    return;
  }
  $("snapshot-rows").replaceChildren(...snapshots.map((s) => row([
    linkButton(s.name, `compatibility of ${s.name}`, () => showSnapshot(s)),
    s.kind, s.template ? "(template)" : (s.sandbox_name ?? "-"), s.backend,
    shortImage(s.image), `${s.memory_mib} MiB`, bytes(s.size), when(s.created_at)])));
  $("image-rows").replaceChildren(...images.map((i) => row([
    linkButton(i.id, `layers of ${i.tags[0] ?? i.id}`, () => showImage(i.digest)),
    i.tags.join(", ") || "(untagged)", bytes(i.size)])));
}

async function showSnapshot(snapshot: Snapshot): Promise<void> {
  let compat: Compatibility;
  try {
    compat = await api<Compatibility>("GET", `/v1/snapshots/${q(snapshot.id)}/compatibility`);
  } catch (error) {
    setStatus((error as Error).message);
    return;
  }
  $("store-detail").hidden = false;
  $("store-detail-title").textContent = `${snapshot.template ? "Template" : "Snapshot"} ${snapshot.name}`;
  facts($("store-facts"), [
    ["Restores here", compat.restorable_here ? "yes" : `no: ${compat.reasons.join("; ")}`],
    ["Kind", compat.kind],
    ["Backend", `${compat.backend} ${compat.backend_version}`],
    ["Architecture", compat.arch], ["CPU model", compat.cpu_model],
    ["Machine", compat.machine || "-"],
    ["vCPUs and memory", `${compat.vcpus}, ${compat.memory_mib} MiB`],
    ["Guest kit", shortDigest(compat.guestkit_digest)],
    ["Base disk", shortDigest(compat.base_image_digest)],
  ]);
  $("store-layers").hidden = true;
}

async function showImage(digest: string): Promise<void> {
  let image: ImageDetails;
  try {
    image = await api<ImageDetails>("GET", `/v1/images/${q(digest)}`);
  } catch (error) {
    setStatus((error as Error).message);
    return;
  }
  $("store-detail").hidden = false;
  $("store-detail-title").textContent = `Image ${image.tags[0] ?? image.id}`;
  facts($("store-facts"), [
    ["Digest", image.digest], ["Platform", image.platform], ["Size", bytes(image.size)],
    ["Command", [...image.entrypoint, ...image.cmd].join(" ") || "-"],
    ["Working directory", image.working_dir || "/"],
    ["Held by", image.held_by.join(", ") || "nothing (removable)"],
  ]);
  $("store-layers").hidden = false;
  $("layer-rows").replaceChildren(...image.layers.map((layer, index) => row([
    `${index + 1}`, shortDigest(layer.digest), bytes(layer.size), layer.media_type])));
}
